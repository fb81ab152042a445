"""One decode step's attention work on the CPU, lminf against vLLM's CPU backend, per part.

The tiny model's shapes (6/2 heads, d 64, L = n_local = 256, n_global 64; lminf's page 16,
the stock backend's 128), a batch of decode requests at one context length, float32, one
thread, process CPU time (robust to other load on the machine), best of 5 × 2,000 calls:

* lminf: the step's plan (StepPlanner.plan, once per step), then per layer the cache write
  (attention.write_kv) and the attention (attention.run, the C++ kernel);
* stock: the scheduler metadata (ops.cpu_attn_get_scheduler_metadata, once per step), then
  per layer ops.cpu_attn_reshape_and_cache and ops.cpu_attention_with_kv_cache, what
  vLLM's CPU attention backend calls.

Python glue around each (vLLM's metadata builders, the layer's forward) is not counted on
either side.

    python bench/bench_cpu_decode_layer.py --contexts 256 16384
"""

import argparse
import sys
import time

import numpy as np
import torch

from common import machine, save

from lminf_vllm import attention
from lminf_vllm.attention import QueryRotation, StepPlanner
from lminf_vllm.config import LMInfConfig

HEADS, KV_HEADS, HEAD_DIM, TRAINED_LENGTH, N_GLOBAL = 6, 2, 64, 256, 64
LMINF_PAGE, STOCK_PAGE, LAYERS = 16, 128, 6


def cpu_microseconds(fn, calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def lminf_parts(batch: int, context: int) -> dict:
    config = LMInfConfig(N_GLOBAL, TRAINED_LENGTH, TRAINED_LENGTH, LMINF_PAGE, TRAINED_LENGTH)
    width = config.num_pinned_pages + config.num_ring_pages
    cache = torch.randn(batch * width + 1, KV_HEADS, LMINF_PAGE, 2 * HEAD_DIM)
    block_table = 1 + torch.arange(batch * width, dtype=torch.int32).view(batch, width)
    inv_freq = 1 / (10000 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    angles = torch.arange(TRAINED_LENGTH + 1).double()[:, None] * inv_freq
    rotation = attention.rotation_for(QueryRotation.from_model_table(
        torch.cat([angles.cos(), angles.sin()], 1).float(), TRAINED_LENGTH + 1, True),
        config, "cpu")
    planner = StepPlanner(config, max_num_reqs=batch, max_num_tokens=batch,
                          device=torch.device("cpu"), num_ring_pages=config.num_ring_pages,
                          tile_queries=attention.plan_tile_queries(config, "cpu"))
    query_start_loc, seq_lens = np.arange(batch + 1), np.full(batch, context)
    plan_step = lambda: planner.plan(query_start_loc, seq_lens, block_table, batch)
    plan = plan_step()
    query, output = torch.randn(batch, HEADS, HEAD_DIM), torch.empty(batch, HEADS, HEAD_DIM)
    key, value = torch.randn(batch, KV_HEADS, HEAD_DIM), torch.randn(batch, KV_HEADS, HEAD_DIM)
    return {"step": cpu_microseconds(plan_step),
            "write": cpu_microseconds(lambda: attention.write_kv(plan, key, value, cache)),
            "attend": cpu_microseconds(
                lambda: attention.run(plan, query, cache, output, rotation, HEAD_DIM ** -0.5))}


def stock_parts(batch: int, context: int) -> dict:
    from vllm import _custom_ops as ops

    pages = -(-context // STOCK_PAGE)
    cache = torch.zeros(batch * pages, KV_HEADS, 2 * STOCK_PAGE, HEAD_DIM)
    key_cache, value_cache = cache.chunk(2, dim=2)
    block_table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    slots = (block_table[:, (context - 1) // STOCK_PAGE] * STOCK_PAGE
             + (context - 1) % STOCK_PAGE).long()
    metadata_step = lambda: ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False, dynamic_causal=None,
        kv_cache_dtype="auto")
    metadata = metadata_step()
    query, output = torch.randn(batch, HEADS, HEAD_DIM), torch.empty(batch, HEADS, HEAD_DIM)
    key, value = torch.randn(batch, KV_HEADS, HEAD_DIM), torch.randn(batch, KV_HEADS, HEAD_DIM)
    write = lambda: ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots,
                                                   "vec", k_scale=1.0, v_scale=1.0,
                                                   kv_cache_dtype="auto")
    attend = lambda: ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=HEAD_DIM ** -0.5,
        causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=0.0, scheduler_metadata=metadata, s_aux=None, dynamic_causal=None)
    return {"step": cpu_microseconds(metadata_step), "write": cpu_microseconds(write),
            "attend": cpu_microseconds(attend)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 16384])
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    attention.cpu_attention.kernel()  # built before anything is timed
    points = []
    print(f"{'context':>8} {'side':>6} {'per step':>9} {'write':>7} {'attend':>8} "
          f"{f'step + {LAYERS} layers':>20}  (µs, CPU time, 1 thread)")
    for context in args.contexts:
        for side, parts in (("lminf", lminf_parts), ("stock", stock_parts)):
            us = parts(args.batch, context)
            total = us["step"] + LAYERS * (us["write"] + us["attend"])
            points.append({"side": side, "context": context, "microseconds": us,
                           "step_total_microseconds": total})
            print(f"{context:>8} {side:>6} {us['step']:9.1f} {us['write']:7.1f} "
                  f"{us['attend']:8.1f} {total:20.1f}")
    path = save("decode_layer", {"settings": vars(args), "command": " ".join(sys.argv),
                                 "layers": LAYERS, "points": points})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
