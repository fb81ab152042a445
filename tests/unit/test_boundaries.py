"""Module boundaries from DESIGN §4: the math knows nothing about vLLM."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["lminf_vllm.rope_frame", "lminf_vllm.config",
                                    "lminf_vllm.attention", "lminf_vllm.receptive_field"])
def test_math_modules_do_not_import_vllm(module):
    code = f"import sys, {module}; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_importing_the_package_is_light():
    # The package is imported at every interpreter start by lminf_vllm_cli.pth.
    code = "import sys, lminf_vllm.patches; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
