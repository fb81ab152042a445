#!/bin/bash
# The one script run on the lent GPU (issue 4): kernel correctness sweep, kernel benchmarks,
# the xformers prefill baseline and the stream runner, in one device call.
#
#   run(command="bash bench/gpu_check.sh [steps]", carry=[".whl", ".gpudata"])
#
# steps: any of tests, bench, shapes, ceiling, xformers, stream, throughput (default: all, in
# that order). throughput: the stream runner's 1B-class random Llama, Λ at 1e7/1e6/1e4 vs
# dense SDPA at L (THROUGHPUT_ARGS adds arguments). BENCH_ARGS and SHAPES_ARGS add arguments
# to bench_kernels.py (e.g. --quick) and bench_prefill_shapes.py (e.g. --windows 1b).
# .whl holds xformers-0.0.35 (pip download, see docs/kernels.md); .gpudata holds val.npy.
# Everything lands under $OUT (at most 8 files come back): gpu_check.log, the JSON results.
set -u
OUT=${OUT:-/tmp/lminf_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
STEPS="${*:-tests bench shapes ceiling xformers stream throughput}"
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
  date -u; git log -1 --oneline 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

if has xformers && ls .whl/xformers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if has tests; then
  echo "== tests/gpu ==" | tee -a "$LOG"
  LMINF_GPU_RESULTS="$OUT/gpu_correctness.jsonl" timeout "${TESTS_TIMEOUT:-300}" \
    python3 -m pytest -q -n "${TESTS_WORKERS:-8}" -p no:cacheprovider ${TESTS_PATHS:-tests/gpu} 2>&1 | tail -40 | tee -a "$LOG"
fi
if has bench; then
  echo "== bench_kernels ==" | tee -a "$LOG"
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/bench_kernels.py --out "$OUT/bench_kernels.json" \
    ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
fi
if has shapes; then
  echo "== bench_prefill_shapes ==" | tee -a "$LOG"
  timeout "${SHAPES_TIMEOUT:-200}" python3 bench/bench_prefill_shapes.py \
    --out "$OUT/prefill_block_shapes.json" ${SHAPES_ARGS:-} 2>&1 | tee -a "$LOG"
fi
if has ceiling; then
  echo "== triton_ceiling ==" | tee -a "$LOG"
  timeout 200 python3 bench/triton_ceiling.py --out "$OUT/triton_ceiling.json" 2>&1 | tee -a "$LOG"
fi
if has bench && has ceiling; then
  python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
k = json.load(open(f"{sys.argv[1]}/bench_kernels.json"))
c = json.load(open(f"{sys.argv[1]}/triton_ceiling.json"))
lam, ceil, sdpa = k["prefill_best"]["tflops"], c["best"]["tflops"], k["sdpa_prefill_window"]["tflops"]
print(f"== prefill, same run: Λ {lam:.0f} TF/s = {lam / ceil:.0%} of Triton's dense loop "
      f"({ceil:.0f}), {lam / sdpa:.0%} of SDPA ({sdpa:.0f} on 4096 x 4160)")
EOF
fi
if has xformers; then
  echo "== bench_xformers_prefill ==" | tee -a "$LOG"
  ARGS=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/bench_kernels.json'))['prefill_best_args']))" 2>/dev/null || echo '{}')
  timeout 120 python3 bench/bench_xformers_prefill.py --out "$OUT/bench_xformers.json" \
    --prefill-args "$ARGS" 2>&1 | tail -30 | tee -a "$LOG"
fi
if has stream; then
  echo "== stream_runner ==" | tee -a "$LOG"
  timeout "${STREAM_TIMEOUT:-300}" python3 bench/stream_runner.py --out "$OUT/stream.json" \
    ${STREAM_ARGS:-} 2>&1 | tail -40 | tee -a "$LOG"
fi
if has throughput; then
  echo "== stream_runner throughput (random 1B-class Llama) ==" | tee -a "$LOG"
  timeout "${THROUGHPUT_TIMEOUT:-300}" python3 bench/stream_runner.py --random-model 1b \
    --throughput 1e7,1e6,1e4 --out "$OUT/stream_1b_throughput.json" ${THROUGHPUT_ARGS:-} \
    2>&1 | tail -30 | tee -a "$LOG"
fi
date -u | tee -a "$LOG"
