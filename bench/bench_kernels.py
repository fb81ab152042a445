"""Decode bandwidth and prefill TFLOP/s of the Λ kernels vs torch SDPA, plus flat cost.

Run on the GPU machine (bench/gpu_check.sh):
    python bench/bench_kernels.py --out bench_kernels.json

Settings (issue 4): bf16, 32 query heads / 8 KV heads, head_dim 128, n_global 64,
n_local 4096, L 4096 (Llama-2's trained length; window = L, so the oldest window pages mix the
exact and capped cases), pages of 16.
  decode:  64 requests at stream lengths >= 1e6. Bytes = K/V bytes of the visible keys
           (64 + 4096 per request) = 1.09 GB; SDPA decodes the same bytes laid out dense.
           Tuning over keys per block x warps x pipeline depth x slices; then batch 1 and 8
           (latency per layer, where launches rule), each beside SDPA on the same bytes.
  prefill: one 4096-token chunk at 1e6 (window full): 4096 x 4160 visible pairs, FLOPs =
           4 * pairs * head_dim * heads, written in bf16 into the step's output as the
           backend runs it; SDPA runs a dense 4096 x 4160 non-causal block. Also
           the first chunk of a stream (causal 4096) against SDPA is_causal.
  flat:    decode and prefill at stream positions 1e4, 1e6, 1e8, 2e8.
Times are medians of triton.testing.do_bench (CUDA events); the decode step is also timed as
a CUDA-graph replay (how a serving step runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lminf_vllm.attention import (build_plan, plan_tile_queries, reference,  # noqa: E402
                                  rotation_for, triton_decode, triton_prefill)
from lminf_vllm.attention.rotation import QueryRotation  # noqa: E402
from lminf_vllm.config import LMInfConfig  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
N_GLOBAL, N_LOCAL = 64, 4096
DTYPE = torch.bfloat16
BYTES = 2  # bf16


def rope_table(rotary_dim, trained_length):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    return QueryRotation(torch.cat([angle.cos(), angle.sin()], 1).float().contiguous().cuda(),
                         rotary_dim, True)


def setup(requests, page_size=16, trained_length=4096, chunk=4096, seed=0):
    """Config, ring cache with shuffled blocks, plan, query and rotation for the requests."""
    g = torch.Generator().manual_seed(seed)
    config = LMInfConfig(n_global=N_GLOBAL, n_local=N_LOCAL, trained_length=trained_length,
                         page_size=page_size, max_prefill_chunk_tokens=chunk)
    width = config.num_pinned_pages + config.num_ring_pages
    query_lens = np.array([q for q, _ in requests])
    seq_lens = np.array([s for _, s in requests])
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    num_blocks = len(requests) * width
    table = torch.randperm(num_blocks, generator=g).view(-1, width).cuda()
    # the plan and rotation table the backend builds on CUDA (one tile per request chunk)
    plan = build_plan(config, qsl, seq_lens, table, num_ring_pages=config.num_ring_pages,
                      tile_queries=plan_tile_queries(config, "cuda"))
    kv = torch.randn(num_blocks, KV_HEADS, page_size, 2 * HEAD_DIM, device="cuda", dtype=DTYPE)
    q = torch.randn(int(qsl[-1]), HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return plan, q, kv, rotation_for(rope_table(HEAD_DIM, trained_length), config, "cuda")


def visible_keys(t):
    return min(t + 1, N_LOCAL) + min(N_GLOBAL, max(0, t + 1 - N_LOCAL))


# Decode configurations (triton_decode.DECODE_BLOCKS keys and num_splits; each spells out
# its key turn, the default changed). The H100's shape first (128 keys, 4 warps, 3 stages,
# keys turned in float32), then the defaults. On the H200 (2026-12-01 runs, docs/kernels.md)
# deeper pipelines (1-3 blocks in flight per program) and 8 warps lost (1.5-2.4 TB/s against
# 3.5): they leave one program per SM, and the loop's arithmetic, not the loads, is what a
# program waits on; smaller programs (more per SM) won.
DECODE_CONFIGS = [
    dict(block_keys=128, num_warps=4, num_stages=3, turn_in_input_dtype=False),
    dict(block_keys=64, num_warps=2, num_stages=2, turn_in_input_dtype=True),
    dict(block_keys=64, num_warps=2, num_stages=2, turn_in_input_dtype=False),
    dict(block_keys=64, num_warps=2, num_stages=3, turn_in_input_dtype=False),
    dict(block_keys=128, num_warps=4, num_stages=2, turn_in_input_dtype=True),
    dict(block_keys=128, num_warps=4, num_stages=5, turn_in_input_dtype=False),
    dict(block_keys=64, num_warps=2, num_stages=2, turn_in_input_dtype=True, maxnreg=160),
    dict(block_keys=64, num_warps=2, num_stages=2, turn_in_input_dtype=True, num_splits=2),
]
PREFILL_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "edge_block_n", "edge_stages",
                "general_block_n", "general_stages", "far_block_n", "turn_pages")
# the long-window default first; then narrower masked and capped blocks (no spills in the
# sm_90 compile), the earlier 32-key capped blocks, pipelined capped blocks, deeper masked
# pipelines, half-height programs. (merge_capped and causal_loop are the default shape's:
# bench_prefill_variants.py compares those.)
PREFILL_CONFIGS = [(128, 128, 8, 3, 64, 3, 64, 1, 64, 1), (128, 128, 8, 3, 32, 2, 32, 1, 64, 8),
                   (128, 128, 8, 3, 64, 2, 32, 1, 64, 8), (128, 128, 8, 3, 64, 2, 64, 2, 64, 8),
                   (128, 128, 8, 3, 32, 2, 64, 2, 64, 8), (128, 128, 8, 3, 32, 3, 32, 1, 64, 8),
                   (128, 128, 8, 3, 64, 3, 32, 1, 64, 8), (64, 64, 4, 3, 32, 2, 32, 1, 64, 8)]

def registers(launch):
    """Registers per thread and spilled bytes of a compiled Triton launch."""
    return dict(n_regs=getattr(launch, "n_regs", None), n_spills=getattr(launch, "n_spills", None))


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def graph_time(fn, iters=20):
    """Median per-call ms of fn captured in a CUDA graph (iters calls per replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return bench(graph.replay) / iters


def decode_bench(position, batch=64, page_size=16, **kernel_args):
    requests = [(1, position + 997 * i) for i in range(batch)]
    plan, q, kv, rot = setup(requests, page_size=page_size, chunk=1)
    (group,) = plan.groups
    scale = HEAD_DIM ** -0.5
    fn = lambda: triton_decode.attend_group(plan, group, q, kv, rot, scale, **kernel_args)  # noqa
    keys = sum(visible_keys(s - 1) for _, s in requests)
    nbytes = keys * KV_HEADS * HEAD_DIM * 2 * BYTES
    ms = bench(fn)
    ms_graph = graph_time(fn)
    return dict(position=position, batch=batch, page_size=page_size, kv_bytes=nbytes,
                ms=ms, ms_graph=ms_graph, tb_per_s=nbytes / ms / 1e9,
                tb_per_s_graph=nbytes / ms_graph / 1e9, **kernel_args,
                **registers(triton_decode.LAST_LAUNCH))


def decode_error(batch=8, **kernel_args):
    """‖out - ref‖ / ‖ref‖ of the decode kernel against reference.attend_group (float32 math
    on the same bf16 inputs), requests at ~1e6."""
    plan, q, kv, rot = setup([(1, 1_000_000 + 997 * i) for i in range(batch)], chunk=1)
    (group,) = plan.groups
    scale = HEAD_DIM ** -0.5
    ref = reference.attend_group(plan, group, q, kv, rot, scale)
    out = triton_decode.attend_group(plan, group, q, kv, rot, scale, **kernel_args)
    return ((out - ref).norm() / ref.norm()).item()


def sdpa_decode_bench(batch=64, keys=N_GLOBAL + N_LOCAL):
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa
    nbytes = 2 * k.numel() * BYTES
    ms = bench(fn)
    ms_graph = graph_time(fn)
    return dict(kv_bytes=nbytes, ms=ms, ms_graph=ms_graph, tb_per_s=nbytes / ms / 1e9,
                tb_per_s_graph=nbytes / ms_graph / 1e9)


def prefill_bench(position, chunk=4096, page_size=16, trained_length=4096, **kernel_args):
    """One chunk of `chunk` queries ending at stream length position + chunk."""
    plan, q, kv, rot = setup([(chunk, position + chunk)], page_size=page_size,
                             trained_length=trained_length, chunk=chunk)
    scale = HEAD_DIM ** -0.5

    output = torch.empty_like(q)

    def fn():  # as the backend calls it: each group's rows straight into the step's output
        for group in plan.groups:
            triton_prefill.attend_group(plan, group, q, kv, rot, scale, output=output,
                                        **kernel_args)

    shape = dict(triton_prefill.block_shape(plan.config, DTYPE, HEAD_DIM), **kernel_args)

    def turn_only():
        for group in plan.groups:
            triton_prefill.turn_pages(group, kv, rot, shape["turn_pages"])

    pairs = sum(visible_keys(t) for t in range(position, position + chunk))
    flops = 4 * pairs * HEAD_DIM * HEADS
    ms = bench(fn, rep=300)
    return dict(position=position, chunk=chunk, page_size=page_size,
                trained_length=trained_length, visible_pairs=pairs, ms=ms,
                tflops=flops / ms / 1e9, turn_pages_ms=bench(turn_only), **kernel_args,
                **registers(triton_prefill.LAST_LAUNCH))


def prefill_errors(configs, position=1_000_000, chunk=4096, page_size=16, trained_length=4096):
    """‖out - ref‖ / ‖ref‖ of each block shape's prefill of one chunk (written in bf16 into
    the step's output, as the backend runs it) against reference.attend_group (float32 math
    on the same bf16 inputs)."""
    plan, q, kv, rot = setup([(chunk, position + chunk)], page_size=page_size,
                             trained_length=trained_length, chunk=chunk)
    (group,) = plan.groups
    scale = HEAD_DIM ** -0.5
    ref = reference.attend_group(plan, group, q, kv, rot, scale)[0]
    errors = []
    for kernel_args in configs:
        output = torch.full_like(q, float("nan"))
        triton_prefill.attend_group(plan, group, q, kv, rot, scale, output=output, **kernel_args)
        out = output[group.query_rows[0]].float()
        errors.append(((out - ref).norm() / ref.norm()).item())
    del ref
    torch.cuda.empty_cache()
    return errors


def sdpa_prefill_bench(queries, keys, causal):
    q = torch.randn(1, HEADS, queries, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(1, KV_HEADS, keys, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))  # flash path
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa
    pairs = queries * keys if not causal else queries * (queries + 1) // 2
    flops = 4 * pairs * HEAD_DIM * HEADS
    ms = bench(fn, rep=300)
    return dict(queries=queries, keys=keys, causal=causal, ms=ms, tflops=flops / ms / 1e9)


def main():
    global N_GLOBAL  # set to 0 for one diagnostic run (prefill_no_global)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer tuning configurations")
    parser.add_argument("--decode-only", action="store_true", help="the decode part alone")
    args = parser.parse_args()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                  time.gmtime()),
                   settings=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                 n_global=N_GLOBAL, n_local=N_LOCAL, dtype=str(DTYPE)))

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    # ---- decode ----
    results["sdpa_decode"] = sdpa_decode_bench()
    print("sdpa decode", results["sdpa_decode"], flush=True)
    tune = []
    for config in DECODE_CONFIGS[: 4 if args.quick else None]:
        r = decode_bench(1_000_000, **config)
        r["rel_err_vs_reference_b8"] = decode_error(**config)
        r["vs_sdpa_graph"] = r["tb_per_s_graph"] / results["sdpa_decode"]["tb_per_s_graph"]
        tune.append(r)
        print("decode", r, flush=True)
    results["decode_tuning"] = tune
    best = max(tune, key=lambda r: r["tb_per_s_graph"])
    results["decode_best"] = best
    results["decode_default"] = decode_bench(1_000_000)
    print("decode defaults", results["decode_default"], flush=True)
    best_args = {k: best[k] for k in set(triton_decode.DECODE_BLOCKS) | {"num_splits"}
                 if k in best}
    results["decode_b32"] = decode_bench(1_000_000, page_size=32, **best_args)
    print("decode B=32", results["decode_b32"], flush=True)
    results["sdpa_decode_again"] = sdpa_decode_bench()  # SDPA's spread within the run
    # small batches: launch overhead and too few programs rule; per layer, graph-replayed
    small = []
    for batch in (1, 8):
        # the defaults (slices for PROGRAMS_PER_SM programs per SM), the best batch-64
        # shape, and twice the defaults' slices (more small programs per SM)
        auto = max(1, min(-(-(N_GLOBAL // 16 + N_LOCAL // 16 + 1) // 4),
                          triton_decode.PROGRAMS_PER_SM * 132 // (batch * KV_HEADS)))
        for args_ in ({}, dict(best_args, num_splits=None), dict(num_splits=2 * auto)):
            r = decode_bench(1_000_000, batch=batch, **args_)
            r["sdpa_dense"] = sdpa_decode_bench(batch=batch)
            r["us_per_layer_graph"] = 1e3 * r["ms_graph"]
            small.append(r)
            print(f"decode batch {batch}", r, flush=True)
    results["decode_small_batch"] = small
    save()
    if args.decode_only:
        for r in tune:
            print(f"decode {r['tb_per_s_graph']:.2f} TB/s graph ({r['vs_sdpa_graph']:.0%} of SDPA)"
                  f" regs {r['n_regs']} spills {r['n_spills']} err {r['rel_err_vs_reference_b8']:.1e}: "
                  f"{ {k: r[k] for k in r if k in best_args} }")
        for r in small:
            print(f"decode batch {r['batch']:>2} splits {r.get('num_splits')}: "
                  f"{r['us_per_layer_graph']:.1f} us per layer "
                  f"(graph); SDPA dense {1e3 * r['sdpa_dense']['ms_graph']:.1f} us")
        return

    # ---- prefill ----
    results["sdpa_prefill_window"] = sdpa_prefill_bench(4096, N_GLOBAL + N_LOCAL, False)
    results["sdpa_prefill_causal"] = sdpa_prefill_bench(4096, 4096, True)
    print("sdpa prefill", results["sdpa_prefill_window"], results["sdpa_prefill_causal"],
          flush=True)
    tune = []
    keys = PREFILL_KEYS
    configs = PREFILL_CONFIGS[:2] if args.quick else PREFILL_CONFIGS
    for config in configs:
        kernel_args = dict(zip(keys, config))
        try:
            r = prefill_bench(1_000_000, **kernel_args)
        except Exception as e:  # e.g. out of shared memory for one configuration
            r = dict(kernel_args, error=repr(e)[:300])
        tune.append(r)
        print("prefill", r, flush=True)
    ran = [r for r in tune if "tflops" in r]
    for r, err in zip(ran, prefill_errors([{k: r[k] for k in keys} for r in ran])):
        r["rel_err_vs_reference"] = err
    results["prefill_tuning"] = tune
    best = max(ran, key=lambda r: r["tflops"])
    kernel_args = {k: best[k] for k in keys}
    results["prefill_best"] = best
    results["prefill_best_args"] = kernel_args  # gpu_check.sh hands these to the xformers run
    # the best configuration against the defaults that tests/gpu checks against the reference
    plan, q, kv, rot = setup([(4096, 1_004_096)])
    (group,) = plan.groups
    scale = HEAD_DIM ** -0.5
    tested = triton_prefill.attend_group(plan, group, q, kv, rot, scale)
    tuned = triton_prefill.attend_group(plan, group, q, kv, rot, scale, **kernel_args)
    best["rel_diff_vs_tested_defaults"] = ((tuned - tested).norm() / tested.norm()).item()
    # the step's output written by the kernel vs a float32 result converted and scattered
    # into it afterwards (what attention.run did before), same chunk, same run
    output = torch.empty_like(q)
    into_output = lambda: triton_prefill.attend_group(  # noqa: E731
        plan, group, q, kv, rot, scale, output=output, **kernel_args)

    def copied():
        output[group.query_rows] = triton_prefill.attend_group(
            plan, group, q, kv, rot, scale, **kernel_args).to(output.dtype)
    results["prefill_output_path"] = dict(into_step_output_ms=bench(into_output, rep=300),
                                          float32_then_scatter_ms=bench(copied, rep=300))
    print("prefill output path", results["prefill_output_path"], flush=True)
    results["prefill_first_chunk"] = prefill_bench(0, **kernel_args)
    results["prefill_L8192"] = prefill_bench(1_000_000, trained_length=8192, **kernel_args)
    results["prefill_b32"] = prefill_bench(1_000_000, page_size=32, **kernel_args)
    # what the far global pages cost: the same chunk with n_global 0 (4096 x 4096 pairs)
    saved, N_GLOBAL = N_GLOBAL, 0
    results["prefill_no_global"] = prefill_bench(1_000_000, **kernel_args)
    N_GLOBAL = saved
    for key in ("prefill_first_chunk", "prefill_L8192", "prefill_b32", "prefill_no_global"):
        print(key, results[key], flush=True)
    save()

    # ---- flat cost ----
    dec_args = best_args
    flat = []
    for position in (10_000, 1_000_000, 100_000_000, 200_000_000):
        d = decode_bench(position, **dec_args)
        p = prefill_bench(position, **kernel_args)
        flat.append(dict(position=position, decode_ms_graph=d["ms_graph"], prefill_ms=p["ms"],
                         decode_us_per_token=1e3 * d["ms_graph"] / 64,
                         prefill_us_per_token=1e3 * p["ms"] / 4096))
    for f in flat:
        f["decode_ratio_to_1e4"] = f["decode_ms_graph"] / flat[0]["decode_ms_graph"]
        f["prefill_ratio_to_1e4"] = f["prefill_ms"] / flat[0]["prefill_ms"]
    results["flat_cost"] = flat
    save()

    # ---- summary table ----
    sd, bd = results["sdpa_decode"], results["decode_best"]
    sw, sc = results["sdpa_prefill_window"], results["sdpa_prefill_causal"]
    bp, fc = results["prefill_best"], results["prefill_first_chunk"]
    print("\n== summary (bf16, 32/8 heads, d128, n_global 64, n_local 4096) ==")
    print(f"decode  SDPA dense {sd['tb_per_s_graph']:.2f} TB/s | Λ paged {bd['tb_per_s_graph']:.2f}"
          f" TB/s (graph; eager {bd['tb_per_s']:.2f}) -> {bd['tb_per_s_graph']/sd['tb_per_s_graph']:.0%}"
          f" {best_args}; defaults {results['decode_default']['tb_per_s_graph']:.2f} TB/s")
    for r in results["decode_small_batch"]:
        print(f"decode batch {r['batch']:>2} {r.get('block_keys')}/{r.get('num_stages')}: "
              f"{r['us_per_layer_graph']:.1f} us per layer (graph; eager {1e3 * r['ms']:.1f}); "
              f"SDPA dense {1e3 * r['sdpa_dense']['ms_graph']:.1f} us")
    print(f"prefill SDPA window {sw['tflops']:.0f} TF/s | Λ {bp['tflops']:.0f} TF/s -> "
          f"{bp['tflops']/sw['tflops']:.0%}; first chunk Λ {fc['tflops']:.0f} vs SDPA causal "
          f"{sc['tflops']:.0f} TF/s")
    for r in results["prefill_tuning"]:
        shape = "/".join(str(r[k]) for k in PREFILL_KEYS)
        if "tflops" in r:
            print(f"prefill {shape}: {r['tflops']:.0f} TF/s, regs {r['n_regs']} spills "
                  f"{r['n_spills']}, err {r['rel_err_vs_reference']:.1e}")
        else:
            print(f"prefill {shape}: {r['error']}")
    for f in flat:
        print(f"flat {f['position']:>11}: decode x{f['decode_ratio_to_1e4']:.3f} prefill "
              f"x{f['prefill_ratio_to_1e4']:.3f}")


if __name__ == "__main__":
    main()
