#!/usr/bin/env bash
# Install, then the main job: the embedded tiny model (trained length 256) scores 16 windows
# of 4,096 held-out tokens (16 L) with lminf and with the stock backend, side by side, and
# prints perplexity by position segment and the path of the saved plot. About 5 minutes on
# 2 cores.
#
#   bash scripts/demo.sh                    # quiet: progress bars, then the table and the PNG
#   bash scripts/demo.sh --verbose          # vLLM's full log (INFO) as well
#   bash scripts/demo.sh --update-results   # write into bench/results instead of a temp folder
#   bash scripts/demo.sh --windows 4        # anything else goes to bench/bench_ppl_vs_position.py
set -euo pipefail
cd "$(dirname "$0")/.."

verbose=0
results_dir="${TMPDIR:-/tmp}/lminf-demo"
bench_args=()
for arg in "$@"; do
    case "$arg" in
        --verbose) verbose=1 ;;
        --update-results) results_dir=bench/results ;;
        *) bench_args+=("$arg") ;;
    esac
done

bash scripts/install.sh
. .venv/bin/activate
if [ "$verbose" = 0 ]; then
    # vLLM's INFO log, library warnings and torch's C++ notices bury the result; the
    # progress bars and the table stay. A VLLM_LOGGING_LEVEL the user set wins.
    export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
    export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TORCH_CPP_LOG_LEVEL=ERROR
fi
python bench/bench_ppl_vs_position.py --results-dir "$results_dir" "${bench_args[@]}"
