#!/usr/bin/env bash
# Install, then the main job: the embedded tiny model (trained length 256) scores 16 windows
# of 4,096 held-out tokens (16 L) with lminf and with the stock backend, side by side, and
# prints perplexity by position segment. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python bench/bench_ppl_vs_position.py "$@"
