"""Λ prefill structures side by side with Triton's dense flash loop, same run (issue 15 item 4).

One 4096-token chunk at 1e6 (bench_kernels' prefill: 4096 x 4160 visible pairs, written in
bf16 into the step's output), with the window loops arranged in each way the kernel offers
(`merge_capped`: the far edge's blocks compute both cases from the dense copy instead of a
capped loop of their own; `causal_loop`: past the far edge one causal loop whose blocks are
masked behind a per-block branch, instead of an unmasked middle and a masked diagonal),
interleaved with bench/triton_ceiling.py's best kernel (128 x 128, 8 warps, 3 stages, split
product) on 4096 x 4096, twice round. Each variant's error against the float32 reference,
registers and spills; the key turn alone as a CUDA-graph replay (its GPU time, not the
launch's host time) by pages per program; then the 1B model's shape (d64), where the
small-head shape runs.

    python bench/bench_prefill_variants.py --out prefill_variants.json [--d128 JSON] [--d64 JSON]

(2026-12-02 runs: `bench/results/2026-12-02_h200_prefill_variants_run*.json`; run 1 also
had a causal loop masking every block, since removed: 298 TF/s at d128, 270 at d64. Runs 8-11,
`2026-12-02_h200_run{8,9,10,11}_prefill_variants.json`: heads packed into a program's rows
(`pack_heads`) and the far global pages from the dense copy (`far_dense`), the defaults now.
Run 14, `2026-12-02_h200_run14_prefill_variants.json`: the masked blocks' tests against per-row
bounds (`edge_masks`, since removed: 439 against 438 TF/s).)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels  # noqa: E402
import triton_ceiling  # noqa: E402
from lminf_vllm.attention import triton_prefill  # noqa: E402

# (name, arguments over the default shape)
D128_VARIANTS = [
    ("default", {}),
    ("one_head_per_program", dict(pack_heads=1, far_dense=0)),   # the defaults before run 8
    ("pages_far_global", dict(far_dense=0)),
    ("pack2", dict(pack_heads=2)),
    ("edge32", dict(edge_block_n=32)),
]
D64_VARIANTS = [("default", {}), ("one_head_per_program", dict(pack_heads=1, edge_block_n=32)),
                ("far_dense", dict(far_dense=1)), ("edge32", dict(edge_block_n=32))]


def ceiling_fn():
    """bench/triton_ceiling.py's best configuration on its own tensors."""
    T, H, KVH, D = triton_ceiling.T, triton_ceiling.HEADS, triton_ceiling.KV_HEADS, \
        triton_ceiling.HEAD_DIM
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(KVH, triton_ceiling.S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    flops = 4 * T * triton_ceiling.S * D * H

    def run():
        triton_ceiling.dense_flash_kernel[(T // 128, H)](
            q, k, v, out, triton_ceiling.S, D ** -0.5 * triton_ceiling.LOG2E, H=H,
            GROUP=H // KVH, D=D, BLOCK_M=128, BLOCK_N=128, SPLIT=True, LAZY=False,
            num_warps=8, num_stages=3)
    return run, flops


def prefill_fn(**kernel_args):
    plan, q, kv, rot = bench_kernels.setup([(4096, 1_004_096)])
    scale = bench_kernels.HEAD_DIM ** -0.5
    output = torch.empty_like(q)

    def run():
        for group in plan.groups:
            triton_prefill.attend_group(plan, group, q, kv, rot, scale, output=output,
                                        **kernel_args)
    return run


def measure(variants, rounds, with_ceiling):
    pairs = sum(bench_kernels.visible_keys(t) for t in range(1_000_000, 1_004_096))
    flops = 4 * pairs * bench_kernels.HEAD_DIM * bench_kernels.HEADS
    fns = {name: prefill_fn(**args) for name, args in variants}
    rows = {name: dict(args, ms=[], regs=None) for name, args in variants}
    ceiling, ceiling_flops = ceiling_fn() if with_ceiling else (None, None)
    ceiling_ms = []
    for name, fn in fns.items():      # compile (and record registers) outside the timing
        fn()
        launch = triton_prefill.LAST_LAUNCH
        rows[name].update(n_regs=launch.n_regs, n_spills=launch.n_spills)
    for _ in range(rounds):
        if ceiling:
            ceiling_ms.append(bench_kernels.bench(ceiling, rep=300))
        for name, fn in fns.items():
            rows[name]["ms"].append(bench_kernels.bench(fn, rep=300))
    errors = bench_kernels.prefill_errors([args for _, args in variants])
    for (name, _), err in zip(variants, errors):
        r = rows[name]
        r["best_ms"] = min(r["ms"])
        r["tflops"] = flops / r["best_ms"] / 1e9
        r["rel_err_vs_reference"] = err
    result = dict(rows=rows, visible_pairs=pairs)
    if ceiling:
        result["ceiling_ms"] = ceiling_ms
        result["ceiling_tflops"] = ceiling_flops / min(ceiling_ms) / 1e9
        for r in rows.values():
            r["of_ceiling"] = r["tflops"] / result["ceiling_tflops"]
    return result


def turn_time(pages_per_program):
    """GPU time of turn_pages_kernel alone (graph replay of 20 launches)."""
    plan, q, kv, rot = bench_kernels.setup([(4096, 1_004_096)])

    def run():
        for group in plan.groups:
            triton_prefill.turn_pages(group, kv, rot, pages_per_program)
    return dict(pages_per_program=pages_per_program, graph_ms=bench_kernels.graph_time(run),
                eager_ms=bench_kernels.bench(run))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-d64", action="store_true")
    parser.add_argument("--d128", default=None, help="JSON [[name, {arguments}], ...]")
    parser.add_argument("--d64", default=None, help="JSON [[name, {arguments}], ...]")
    parser.add_argument("--turn-pages", default="8", help="pages per program to time the "
                        "key turn with, comma-separated")
    args = parser.parse_args()
    d128 = json.loads(args.d128) if args.d128 else D128_VARIANTS
    d64 = json.loads(args.d64) if args.d64 else D64_VARIANTS
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    results["d128"] = measure(d128, args.rounds, True)
    results["turn_pages_d128"] = [turn_time(int(p)) for p in args.turn_pages.split(",")]
    save()
    print(f"== d128 (32/8 heads, n_local = L = 4096, chunk 4096 at 1e6), ceiling "
          f"{results['d128']['ceiling_tflops']:.0f} TF/s "
          f"({', '.join(f'{m:.3f}' for m in results['d128']['ceiling_ms'])} ms); key turn "
          + ", ".join(f"{t['graph_ms'] * 1e3:.1f} us ({t['pages_per_program']} pages per "
                      f"program)" for t in results["turn_pages_d128"]) + " (graph) ==",
          flush=True)
    for name, r in results["d128"]["rows"].items():
        print(f"  {name:<26} {r['tflops']:.0f} TF/s ({', '.join(f'{m:.3f}' for m in r['ms'])}"
              f" ms) = {r['of_ceiling']:.3f} of ceiling; regs {r['n_regs']} spills "
              f"{r['n_spills']}; err {r['rel_err_vs_reference']:.1e}", flush=True)
    if args.skip_d64:
        return
    bench_kernels.HEAD_DIM = 64     # the stream runner's 1B-class model
    results["d64"] = measure(d64, args.rounds, False)
    save()
    print("== d64 (the 1B model's attention) ==")
    for name, r in results["d64"]["rows"].items():
        print(f"  {name:<26} {r['tflops']:.0f} TF/s ({', '.join(f'{m:.3f}' for m in r['ms'])}"
              f" ms); regs {r['n_regs']} spills {r['n_spills']}; "
              f"err {r['rel_err_vs_reference']:.1e}", flush=True)


if __name__ == "__main__":
    main()
