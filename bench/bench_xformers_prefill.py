"""Baseline: Λ prefill of one chunk with xformers (exact local window + global branch, LSE merge).

The alternative issue 4 asks to weigh against the Triton prefill kernel:
  1. gather the window's pages from the ring into a dense K/V (positions anchor-relative),
  2. turn keys by b_p - a and queries by t - t mod B - a (a = the chunk's first page base), so
     plain RoPE relative distances t - j appear: exact for n_local <= L - B + 1,
  3. xformers memory_efficient_attention_partial with a bottom-right causal local mask of
     n_local (the window branch) -> (out, lse); the op is xformers' Triton split-K kernel, the
     only one of the 3 MB wheel that runs with the device's torch (see _xformers_op),
  4. the global branch: queries turned by L - t mod B against the pinned pages as stored
     (capped distance), no mask (valid once the chunk is past n_global + n_local),
  5. xformers merge_attentions of the two.
It only covers the far regime (t - b_p > L for every global page, no overlap of the two
branches, n_local <= L - B + 1); the Triton kernel covers every position with one code path.
Timed end to end (gather and turns included), against the Triton kernel on the same inputs
(L = 8192 so both compute exact window distances), and checked against it.

    python bench/bench_xformers_prefill.py --out bench_xformers.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_kernels import (DTYPE, HEAD_DIM, HEADS, KV_HEADS, N_GLOBAL, N_LOCAL,  # noqa: E402
                           bench, setup, visible_keys)
from lminf_vllm import rope_frame  # noqa: E402
from lminf_vllm.attention import triton_prefill  # noqa: E402
from lminf_vllm.attention.rotation import rotate  # noqa: E402


def _xformers_op():
    """The one xformers forward op usable on the device: the PyPI wheel's CUDA extension is
    built against another torch than the device's 2.11, so only its Triton split-K kernel runs
    (fa2/fa3/cutlass report "xFormers wasn't build with CUDA support")."""
    from xformers.ops import fmha
    import xformers.ops.fmha.common as common
    # Its CUDA check only reflects the C++ extension that failed to load; the split-K kernel
    # itself is pure Triton and runs.
    common._built_with_cuda = True
    return fmha.triton_splitk.FwOp


XFORMERS_OP = None


def xformers_prefill(plan, block_table_row, q, kv, rot, scale, position, chunk):
    """Λ attention of queries at position .. position + chunk - 1 via xformers. [C, H, D]."""
    from xformers.ops import fmha
    config = plan.config
    page_size = config.page_size
    group = HEADS // KV_HEADS
    device = q.device
    t = torch.arange(position, position + chunk, device=device)
    anchor = position - position % page_size
    # (1) the window's pages, gathered dense
    first_page = max(position - config.n_local + 1, 0) // page_size
    last_page = (position + chunk - 1) // page_size
    pages = torch.arange(first_page, last_page + 1, device=device)
    column = rope_frame.table_slot(pages, config.num_pinned_pages, config.num_ring_pages)
    window = kv[block_table_row[column]]                             # [P, Hkv, B, 2D]
    # (2) keys turned by b_p - a, queries by t - t mod B - a
    key_angle = (pages * page_size - anchor)[:, None, None].expand(-1, 1, page_size)
    cos, sin = rot.cos_sin_of(key_angle)
    k = rotate(window[..., :HEAD_DIM].float(), cos, sin, True).to(DTYPE)
    v = window[..., HEAD_DIM:]
    num_keys = position + chunk - first_page * page_size
    k = k.transpose(1, 2).reshape(-1, KV_HEADS, HEAD_DIM)[:num_keys]
    v = v.transpose(1, 2).reshape(-1, KV_HEADS, HEAD_DIM)[:num_keys]
    cos, sin = rot.cos_sin_of((t - t % page_size - anchor)[:, None])
    q_local = rotate(q.float(), cos, sin, True).to(DTYPE)
    # (3) the window branch
    bmghk = lambda x: x.view(1, x.shape[0], KV_HEADS, -1, HEAD_DIM)  # noqa: E731
    expand = lambda x: bmghk(x).expand(-1, -1, -1, group, -1)  # noqa: E731
    # split-K takes local/causal bias objects only for <= 16 queries: a dense additive bias
    # (its rows padded to a multiple of 8 for alignment, then sliced) carries the window
    key_position = first_page * page_size + torch.arange(num_keys, device=device)
    dist = t[:, None] - key_position[None, :]
    width = -(-num_keys // 8) * 8
    bias = torch.full((chunk, width), float("-inf"), device=device, dtype=DTYPE)
    bias[:, :num_keys].masked_fill_((dist >= 0) & (dist < config.n_local), 0.0)
    bias = bias[:, :num_keys][None, None, None].expand(1, KV_HEADS, group, chunk, num_keys)
    out_local, lse_local = fmha.memory_efficient_attention_partial(
        bmghk(q_local), expand(k), expand(v), attn_bias=bias, scale=scale, op=XFORMERS_OP)
    # (4) the global branch: capped distance L - t mod B
    global_blocks = block_table_row[: config.num_pinned_pages]
    pinned = kv[global_blocks].transpose(1, 2).reshape(-1, KV_HEADS, 2 * HEAD_DIM)
    pinned = pinned[: config.n_global]
    cos, sin = rot.cos_sin_of((config.trained_length - t % page_size)[:, None])
    q_global = rotate(q.float(), cos, sin, True).to(DTYPE)
    out_global, lse_global = fmha.memory_efficient_attention_partial(
        bmghk(q_global), expand(pinned[..., :HEAD_DIM].contiguous()),
        expand(pinned[..., HEAD_DIM:].contiguous()), scale=scale, op=XFORMERS_OP)
    # (5) merge by log-sum-exp
    out, _ = fmha.merge_attentions([out_local, out_global], [lse_local, lse_global],
                                   write_lse=False, output_dtype=torch.float32)
    return out.view(chunk, HEADS, HEAD_DIM)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefill-args", default="{}", help="JSON kwargs of the Triton kernel")
    args = parser.parse_args()
    import xformers
    global XFORMERS_OP
    XFORMERS_OP = _xformers_op()
    kernel_args = json.loads(args.prefill_args)
    position, chunk, trained_length = 1_000_000, 4096, 8192
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   xformers=xformers.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   settings=dict(position=position, chunk=chunk, trained_length=trained_length,
                                 heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                 n_global=N_GLOBAL, n_local=N_LOCAL, dtype=str(DTYPE)))
    torch.manual_seed(0)
    plan, q, kv, rot = setup([(chunk, position + chunk)], trained_length=trained_length)
    scale = HEAD_DIM ** -0.5
    # the request's block table row, recovered from the plan's single-request groups
    config = plan.config
    width = config.num_pinned_pages + config.num_ring_pages
    row = torch.zeros(width, dtype=torch.long, device="cuda")
    for g in plan.groups:
        base = g.page_base.flatten()
        ok = base >= 0
        page = base[ok] // config.page_size
        row[rope_frame.table_slot(page, config.num_pinned_pages, config.num_ring_pages)] = \
            g.page_block.flatten()[ok]

    def triton_fn():
        return torch.cat([triton_prefill.attend_group(plan, g, q, kv, rot, scale, **kernel_args
                                                      ).flatten(0, 1) for g in plan.groups])

    xf = xformers_prefill(plan, row, q, kv, rot, scale, position, chunk)
    tr = triton_fn()
    rows = torch.cat([g.query_rows.flatten() for g in plan.groups])
    tr_by_row = torch.empty_like(tr)
    tr_by_row[rows] = tr
    results["rel_err_xformers_vs_triton"] = ((xf - tr_by_row).norm() / tr_by_row.norm()).item()
    pairs = sum(visible_keys(t) for t in range(position, position + chunk))
    flops = 4 * pairs * HEAD_DIM * HEADS
    ms_x = bench(lambda: xformers_prefill(plan, row, q, kv, rot, scale, position, chunk), rep=300)
    ms_t = bench(triton_fn, rep=300)
    results["xformers"] = dict(ms=ms_x, tflops=flops / ms_x / 1e9)
    results["triton"] = dict(ms=ms_t, tflops=flops / ms_t / 1e9, **kernel_args)
    results["faster"] = "triton" if ms_t <= ms_x else "xformers"
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))
    print(f"\n== xformers prefill {results['xformers']['tflops']:.0f} TF/s vs Triton "
          f"{results['triton']['tflops']:.0f} TF/s (chunk 4096 at 1e6, L 8192); rel err "
          f"{results['rel_err_xformers_vs_triton']:.1e}; faster: {results['faster']}")


if __name__ == "__main__":
    main()
