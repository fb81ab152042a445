"""One long stream through a real CPU engine (tiny model, LMINF): per-slice speed and RSS.

The stream is a prompt of `--tokens` ids (the held-out text, repeated) plus a few decoded
tokens, prefilled in chunks of the per-request cap. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so each step reads the request's computed tokens, the
blocks it holds in vLLM's block pool and the process RSS (engine core + worker).
Reported per slice of `--slice` tokens: tokens/s and its ratio to the first slice, blocks
held, RSS.

    python bench/bench_engine_stream.py --tokens 1000000
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from common import MODEL_DIR, REPO, VAL_TOKENS, rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=lambda s: int(float(s)), default=1_000_000)
    parser.add_argument("--slice", type=lambda s: int(float(s)), default=100_000)
    parser.add_argument("--n-global", type=int, default=64)
    parser.add_argument("--n-local", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256,
                        help="lminf.max_prefill_chunk_tokens")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
              max_model_len=200_000_000, max_num_seqs=4, gpu_memory_utilization=0.3,
              enforce_eager=True, max_num_batched_tokens=max(args.chunk, 256),
              additional_config={"lminf": {"n_global": args.n_global, "n_local": args.n_local,
                                           "max_prefill_chunk_tokens": args.chunk}})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    text = np.load(VAL_TOKENS)
    prompt = np.resize(text, args.tokens - 4).tolist()
    engine.add_request("stream", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    del prompt
    rows, next_mark = [], args.slice
    start = last_time = time.perf_counter()
    last_tokens = 0
    max_blocks = 0
    # vLLM appends '-<8 hex>' to the id a request is added with
    (internal_id,) = [r for r in scheduler.requests if r.startswith("stream-")]
    while engine.has_unfinished_requests():
        engine.step()
        request = scheduler.requests.get(internal_id)
        if request is None:
            break
        max_blocks = max(max_blocks, free_before - pool.get_num_free_blocks())
        done = request.num_computed_tokens
        if done >= next_mark:
            now = time.perf_counter()
            rate = (done - last_tokens) / (now - last_time)
            rows.append(dict(tokens=done, seconds=now - start, tokens_per_second=rate,
                             ratio_to_first=rate / rows[0]["tokens_per_second"] if rows
                             else 1.0,
                             blocks_in_use=free_before - pool.get_num_free_blocks(),
                             rss_bytes=rss_bytes()))
            print(json.dumps(rows[-1]), flush=True)
            last_time, last_tokens, next_mark = now, done, next_mark + args.slice
    import torch
    import vllm
    config = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec
    result = dict(
        bench="engine_stream",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(), cpu_count=os.cpu_count(), vllm=vllm.__version__,
        torch=torch.__version__, settings=vars(args),
        pages_per_request=config.num_pinned_pages + config.num_ring_pages,
        max_blocks_in_use=max_blocks, pool_restored=pool.get_num_free_blocks() == free_before,
        seconds=time.perf_counter() - start, slices=rows)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (
        f"{datetime.date.today().isoformat()}_{platform.node()}_engine_stream.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "slices"}, indent=1))


if __name__ == "__main__":
    main()
