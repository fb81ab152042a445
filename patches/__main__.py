"""`python -m lminf_vllm.patches`: docs/patches.md on stdout;
`python -m lminf_vllm.patches check-wheels [--cache DIR]`: the wheel-source check."""

import sys

if sys.argv[1:2] == ["check-wheels"]:
    from .check_wheels import main

    sys.exit(main(sys.argv[2:]))

from . import markdown

print(markdown())
