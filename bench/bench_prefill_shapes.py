"""Prefill block shapes against window length and head size, on the GPU (bench/gpu_check.sh
step `shapes`).

Picks triton_prefill's default shapes: for each window the kernel runs one chunk at 1e6 with
each block shape, same run, beside torch SDPA on the same pairs (non-causal over the chunk's
visible keys, and causal over the chunk alone: the stream runner's dense baseline), and
each shape's error against the float32 reference. Windows: the tiny model's (6/2 heads,
d64, L = n_local = 256, chunk 32768, as bench/stream_runner.py runs it), issue 4's shapes
(32/8 heads, d128, chunk 4096) with n_local = L in {256, 1024, 2048, 4096}, and the stream
runner's 1B-class model (32/8 heads, d64, n_local = L = 4096, chunk 4096).

    python bench/bench_prefill_shapes.py --out prefill_block_shapes.json [--windows 1b,d128_4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels  # noqa: E402

KEYS = ("block_m", "block_n", "num_warps", "num_stages", "edge_block_n", "edge_stages",
        "general_block_n", "general_stages")
SHAPES = [(128, 128, 8, 3, 64, 2, 32, 1), (64, 128, 4, 3, 32, 2, 32, 1),
          (64, 128, 4, 3, 32, 2, 64, 2), (64, 128, 4, 2, 32, 2, 32, 1),
          (64, 128, 4, 3, 32, 3, 32, 1), (64, 128, 4, 3, 64, 2, 32, 1),
          (64, 64, 4, 3, 32, 2, 32, 1), (128, 128, 8, 3, 32, 2, 64, 2)]
# name: (query heads, KV heads, head_dim, n_local = L, chunk)
WINDOWS = {"tiny": (6, 2, 64, 256, 32768), "d128_256": (32, 8, 128, 256, 4096),
           "d128_1024": (32, 8, 128, 1024, 4096), "d128_2048": (32, 8, 128, 2048, 4096),
           "d128_4096": (32, 8, 128, 4096, 4096), "1b": (32, 8, 64, 4096, 4096)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--windows", default=",".join(WINDOWS),
                        help=f"comma-separated, of {sorted(WINDOWS)}")
    args = parser.parse_args()
    names = args.windows.split(",")
    unknown = set(names) - set(WINDOWS)
    if unknown:
        raise SystemExit(f"--windows: unknown {sorted(unknown)}; known {sorted(WINDOWS)}")
    rows, sdpa = [], {}
    for name in names:
        heads, kv_heads, head_dim, n_local, chunk = WINDOWS[name]
        # bench_kernels' setup reads these module settings
        bench_kernels.HEADS, bench_kernels.KV_HEADS = heads, kv_heads
        bench_kernels.HEAD_DIM, bench_kernels.N_LOCAL = head_dim, n_local
        visible = bench_kernels.N_GLOBAL + n_local
        sdpa[name] = dict(window=bench_kernels.sdpa_prefill_bench(chunk, visible, False),
                          causal=bench_kernels.sdpa_prefill_bench(chunk, chunk, True))
        print(name, "sdpa", sdpa[name], flush=True)
        shapes = [dict(zip(KEYS, shape)) for shape in SHAPES]
        # the reference materialises [T, P * B] logits per head: only for chunks of 4096
        errors = (bench_kernels.prefill_errors(shapes, chunk=chunk, trained_length=n_local)
                  if chunk <= 4096 else [None] * len(shapes))
        for blocks, err in zip(shapes, errors):
            r = bench_kernels.prefill_bench(1_000_000, chunk=chunk, trained_length=n_local,
                                            **blocks)
            row = dict(window=name, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       n_local=n_local,
                       **{k: r[k] for k in ("chunk", "ms", "tflops", "turn_pages_ms", "n_regs",
                                            "n_spills")},
                       rel_err_vs_reference=err, **blocks)
            rows.append(row)
            print(row, flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sdpa=sdpa,
                       rows=rows), f, indent=1)
    for name in names:
        mine = [r for r in rows if r["window"] == name]
        for r in mine:
            print(f"== {name}: {'/'.join(str(r[k]) for k in KEYS)} {r['tflops']:.0f} TF/s "
                  f"({r['ms']:.3f} ms) regs {r['n_regs']} spills {r['n_spills']} "
                  f"err {r['rel_err_vs_reference'] or float('nan'):.1e}")
        best = max(mine, key=lambda r: r["tflops"])
        print(f"== {name} best {'/'.join(str(best[k]) for k in KEYS)} {best['tflops']:.0f} "
              f"TF/s; SDPA window {sdpa[name]['window']['tflops']:.0f}, causal "
              f"{sdpa[name]['causal']['tflops']:.0f} TF/s")


if __name__ == "__main__":
    main()
