"""Prefill block shapes against window length, on the GPU (bench/gpu_check.sh step `shapes`).

Picks triton_prefill.LONG_WINDOW: for each window the kernel runs one chunk at 1e6 with each
block shape, same run. Windows: the tiny model's (6/2 heads, d64, L = n_local = 256, chunk
32768, as bench/stream_runner.py runs it) and issue 4's shapes (32/8 heads, d128, chunk 4096)
with n_local = L in {256, 1024, 2048, 4096}.

    python bench/bench_prefill_shapes.py --out prefill_block_shapes.json
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

KEYS = ("block_m", "block_n", "num_warps", "num_stages", "edge_block_n", "edge_stages")
SHAPES = [(64, 64, 4, 3, 64, 1), (64, 64, 4, 3, 32, 2), (64, 32, 4, 3, 32, 1),
          (128, 128, 8, 3, 64, 2), (128, 128, 8, 3, 32, 2), (128, 64, 8, 3, 64, 2)]
# (query heads, KV heads, head_dim, n_local = L, chunk)
WINDOWS = [(6, 2, 64, 256, 32768), (32, 8, 128, 256, 4096), (32, 8, 128, 1024, 4096),
           (32, 8, 128, 2048, 4096), (32, 8, 128, 4096, 4096)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for heads, kv_heads, head_dim, n_local, chunk in WINDOWS:
        # bench_kernels' setup reads these module settings
        bench_kernels.HEADS, bench_kernels.KV_HEADS = heads, kv_heads
        bench_kernels.HEAD_DIM, bench_kernels.N_LOCAL = head_dim, n_local
        for shape in SHAPES:
            blocks = dict(zip(KEYS, shape))
            r = bench_kernels.prefill_bench(1_000_000, chunk=chunk, trained_length=n_local,
                                            **blocks)
            row = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, n_local=n_local,
                       **{k: r[k] for k in ("chunk", "ms", "tflops", "n_regs", "n_spills")},
                       **blocks)
            rows.append(row)
            print(row, flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows),
                  f, indent=1)
    for heads, _, head_dim, n_local, _ in WINDOWS:
        mine = [r for r in rows if r["heads"] == heads and r["n_local"] == n_local]
        best = max(mine, key=lambda r: r["tflops"])
        print(f"== {heads} heads d{head_dim} n_local {n_local}: best "
              f"{best['block_m']}x{best['block_n']} w{best['num_warps']} "
              f"edge {best['edge_block_n']}/{best['edge_stages']} {best['tflops']:.0f} TF/s")


if __name__ == "__main__":
    main()
