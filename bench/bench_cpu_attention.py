"""One layer's prefill attention on the CPU: the reference, cpu_attention and vLLM's CPU kernel.

Same shapes (SmolLM2-135M: 9/3 heads, d 64, B 128, n_local = L = 8,192), one chunk of
queries at the end of a longer context, float32; the three run in turn, each repeat, and the
best time of each is reported with the work it did. vLLM's kernel
(`ops.cpu_attention_with_kv_cache`, what the stock CPU backend calls) runs plain causal
attention over the whole context (the stock model's work); the lminf paths run the Λ window
(the reference gets fewer repeats: it is slow). Work in visible (query, key) pairs.

    python bench/bench_cpu_attention.py --chunk 2048 --context 16384
"""

import argparse
import sys
import time

import numpy as np
import torch

from common import machine, save

from lminf_vllm import rope_frame
from lminf_vllm.attention import QueryRotation, build_plan, cpu_attention, reference
from lminf_vllm.config import LMInfConfig

HEADS, KV_HEADS, HEAD_DIM, PAGE, WINDOW = 9, 3, 64, 128, 8192


def best_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU time (with --threads 1: robust to other load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from vllm import _custom_ops as ops

    config = LMInfConfig(64, WINDOW, WINDOW, PAGE, args.chunk)
    ring, pinned = config.num_ring_pages, config.num_pinned_pages
    lminf_cache = torch.randn(pinned + ring, KV_HEADS, PAGE, 2 * HEAD_DIM)
    block_table = torch.randperm(pinned + ring)[None]
    inv_freq = 1 / (100000 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    angles = torch.arange(WINDOW + 1).double()[:, None] * inv_freq
    rotation = QueryRotation.from_model_table(
        torch.cat([angles.cos(), angles.sin()], 1).float(), WINDOW + 1, True)
    tile = cpu_attention.tile_queries(config)
    cpu_attention.kernel()  # built before anything is timed
    query = torch.randn(args.chunk, HEADS, HEAD_DIM)
    output = torch.empty_like(query)
    boundaries = np.array([0, args.chunk])
    plan = lambda tiles: build_plan(config, boundaries, np.array([args.context]), block_table,
                                    ring, tile_queries=tiles)
    fast_plan, reference_plan = plan(tile), plan(128)

    num_blocks = args.context // PAGE
    stock_cache = torch.zeros(num_blocks, KV_HEADS, 2 * PAGE, HEAD_DIM)
    key_cache, value_cache = stock_cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(torch.randn(args.context, KV_HEADS, HEAD_DIM),
                                   torch.randn(args.context, KV_HEADS, HEAD_DIM), key_cache,
                                   value_cache, torch.arange(args.context), "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    query_start = torch.tensor(boundaries, dtype=torch.int32)
    seq_lens = torch.tensor([args.context], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start, causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False, dynamic_causal=None,
        kv_cache_dtype="auto")

    def stock():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=query_start, seq_lens=seq_lens, scale=0.125, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=torch.arange(
                num_blocks, dtype=torch.int32)[None], softcap=0.0,
            scheduler_metadata=metadata, s_aux=None, dynamic_causal=None)

    paths = {
        "vllm_cpu_kernel_causal": (stock, args.repeats),
        "lminf_cpu_attention": (lambda: cpu_attention.attend(fast_plan, query, lminf_cache,
                                                             output, rotation, 0.125),
                                args.repeats),
        "lminf_reference": (lambda: reference.attend(reference_plan, query, lminf_cache, output,
                                                     rotation, 0.125), 1),
    }
    first = args.context - args.chunk
    # lminf's visible pairs, counted from the mask itself (DESIGN §2): below L a query
    # sees its whole causal past, past L the global prefix and its window.
    position = torch.arange(first, args.context)[:, None]
    key = torch.arange(args.context)[None, :]
    lminf_pairs = int(rope_frame.visible(position, key, config.n_global, config.n_local).sum())
    pairs = {"vllm_cpu_kernel_causal": args.chunk * first + args.chunk * (args.chunk + 1) // 2,
             "lminf_cpu_attention": lminf_pairs, "lminf_reference": lminf_pairs}
    clock = time.process_time if args.cpu_time else time.perf_counter
    seconds = {name: best_seconds(fn, repeats, clock) for name, (fn, repeats) in paths.items()}
    print(f"chunk {args.chunk} at context {args.context}, {args.threads} threads, "
          f"{machine()['cpu']}")
    for name, value in seconds.items():
        print(f"{name:>24}: {value * 1e3:9.1f} ms  {pairs[name] / value / 1e6:8.1f} M pairs/s")
    path = save(f"attention_layer_{args.threads}t", {
        "settings": vars(args), "command": " ".join(sys.argv), "seconds": seconds,
        "visible_pairs": pairs})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
