"""Engine host memory at startup vs max_model_len, with and without the bounded_buffers patch.

Starts the tiny model with LMINF in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so one
process holds the engine core and the worker) and reports the process RSS minus the KV cache
tensors (the KV budget is a fixed share of memory on CPU, so what the token buffers take
comes out of it; RSS alone barely moves), then runs one 600-token request.

    python bench/bench_startup_memory.py --max-model-len 2e8 --max-num-seqs 256
    python bench/bench_startup_memory.py --max-model-len 1e7 --max-num-seqs 16 --without-bounded-buffers

One configuration per process (vLLM's plugin and config state is per process); each run
appends one JSON row to bench/results/<date>_<machine>_startup_memory.jsonl.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import time

from common import MODEL_DIR, REPO, rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-model-len", type=lambda s: int(float(s)), default=200_000_000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--without-bounded-buffers", action="store_true",
                        help="baseline: leave patches/bounded_buffers.py out")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import lminf_vllm.patches as patches
    if args.without_bounded_buffers:
        patches.PATCHES = tuple(p for p in patches.PATCHES if p.name != "bounded_buffers")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              gpu_memory_utilization=0.3, enforce_eager=True,
              additional_config={"lminf": {"n_global": 32, "n_local": 128}})
    startup_seconds = time.perf_counter() - start
    rss_after_start = rss_bytes()
    llm.generate([{"prompt_token_ids": list(range(1, 600))}],
                 SamplingParams(max_tokens=4), use_tqdm=False)
    kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    kv_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors)
    import torch
    import vllm
    row = dict(
        bench="startup_memory",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), cpu_count=os.cpu_count(), vllm=vllm.__version__,
        torch=torch.__version__, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, bounded_buffers=not args.without_bounded_buffers,
        startup_seconds=startup_seconds,
        kv_cache_bytes=kv_bytes, rss_after_start_bytes=rss_after_start,
        non_kv_after_start_bytes=rss_after_start - kv_bytes,
        rss_after_request_bytes=rss_bytes(),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(row))
    out = REPO / "bench" / "results" / (
        f"{datetime.date.today().isoformat()}_{platform.node()}_startup_memory.jsonl")
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
