"""How fast Triton runs plain flash attention on this GPU: the ceiling for the Λ prefill.

A dense, mask-free flash-attention forward (no pages, no rotation, no window: the Λ kernel's
unmasked middle loop alone) over 4096 queries x 4096 keys, bf16, 32/8 heads, d128, against
torch SDPA on the same tensors in the same run. Variants: block shapes, one K=128 product per
block vs two K=64 products (the Λ kernel's split into rotation halves), and lazy rescaling
(rescale the accumulator only when a block raises some row's max by more than 2^8; a branch
per block).

    python bench/triton_ceiling.py --out triton_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

T = S = 4096
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LOG2E = 1.4426950408889634


@triton.jit
def dense_flash_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, scale_log2,
                       H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                       LAZY: tl.constexpr):
    """q, o: [T, H, D]; k, v: [Hkv, S, D]. One program per (BLOCK_M rows, head)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    keys = k_ptr + (head // GROUP) * S * D
    values = v_ptr + (head // GROUP) * S * D
    HALF: tl.constexpr = D // 2
    h = tl.arange(0, HALF)
    d = tl.arange(0, D)
    q_row = q_ptr + m[:, None] * (H * D) + head * D
    q = (tl.load(q_row + d[None, :]).to(tl.float32) * scale_log2).to(tl.bfloat16)
    q1 = (tl.load(q_row + h[None, :]).to(tl.float32) * scale_log2).to(tl.bfloat16)
    q2 = (tl.load(q_row + HALF + h[None, :]).to(tl.float32) * scale_log2).to(tl.bfloat16)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in tl.range(0, S, BLOCK_N):
        key = (j + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None] * D
        if SPLIT:
            s = tl.dot(q1, tl.trans(tl.load(keys + key + h[None, :])))
            s = tl.dot(q2, tl.trans(tl.load(keys + key + HALF + h[None, :])), s)
        else:
            s = tl.dot(q, tl.trans(tl.load(keys + key + d[None, :])))
        v = tl.load(values + key + d[None, :])
        if LAZY:
            m_block = tl.max(s, 1)
            if tl.max(m_block - m_i, 0) > 8.0:
                m_new = tl.maximum(m_i, m_block)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.exp2(s - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    tl.store(o_ptr + m[:, None] * (H * D) + head * D + d[None, :],
             (acc / l_i[:, None]).to(tl.bfloat16))


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    q = torch.randn(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(KV_HEADS, S, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flops = 4 * T * S * HEAD_DIM * HEADS
    group = HEADS // KV_HEADS
    q_sdpa = q.transpose(0, 1).unsqueeze(0)
    k_sdpa, v_sdpa = (x.repeat_interleave(group, 0).unsqueeze(0) for x in (k, v))
    sdpa = lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa)  # noqa: E731
    expected = sdpa()[0].transpose(0, 1).float()
    rows = [dict(kernel="sdpa", ms=bench(sdpa))]
    out = torch.empty_like(q)
    for split, lazy in ((True, False), (False, False), (True, True)):
        for block_m, block_n, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 2),
                                                (128, 64, 8, 3), (64, 64, 4, 3)):
            def run():
                return dense_flash_kernel[(T // block_m, HEADS)](
                    q, k, v, out, S, HEAD_DIM ** -0.5 * LOG2E, H=HEADS, GROUP=group,
                    D=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, LAZY=lazy,
                    num_warps=warps, num_stages=stages)
            launch = run()
            rows.append(dict(kernel="triton", split=split, lazy=lazy, block_m=block_m,
                             block_n=block_n, num_warps=warps, num_stages=stages,
                             ms=bench(run), max_err=(out.float() - expected).abs().max().item(),
                             n_regs=launch.n_regs, n_spills=launch.n_spills))
            print(rows[-1], flush=True)
    rows.append(dict(kernel="sdpa", ms=bench(sdpa)))
    for row in rows:
        row["tflops"] = flops / row["ms"] / 1e9
    best = max((r for r in rows if r["kernel"] == "triton"), key=lambda r: r["tflops"])
    sdpa_tflops = sum(r["tflops"] for r in rows if r["kernel"] == "sdpa") / 2
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       shape=dict(queries=T, keys=S, heads=HEADS, kv_heads=KV_HEADS,
                                  head_dim=HEAD_DIM, dtype="bfloat16"),
                       rows=rows, best=best, sdpa_tflops_mean=sdpa_tflops), f, indent=1)
    print(f"== dense flash ceiling: Triton {best['tflops']:.0f} TF/s "
          f"({best['block_m']}x{best['block_n']}, split {best['split']}) vs SDPA "
          f"{sdpa_tflops:.0f} TF/s -> {best['tflops'] / sdpa_tflops:.0%}")


if __name__ == "__main__":
    main()
