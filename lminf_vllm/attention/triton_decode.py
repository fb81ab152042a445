"""Triton Λ-attention decode: one query per request against its pinned pages and ring.

Reads the same TileGroup as `reference.attend_group` (decode groups have T == 1) and computes
the same function (DESIGN §2-3), with the angle and the mask derived in-kernel from
query_position and page_base by the formulas of `rope_frame`:

    angle(t, p) = min(t - b_p, L) - t mod B                    (rope_frame.query_angle)
    visible(t, j) = j <= t and (j < n_global or t - j < n_local)  (rope_frame.visible)

Instead of rotating the query by +angle for every page, the kernel turns each key of the page
by -angle: rotations are orthogonal, so <R(a) q, k> = <q, R(-a) k>, and one block of keys
can then span several pages with different angles. Cos and sin come from the model's own
table (QueryRotation.cos_sin), indexed by |angle| with the sign folded into sin.

Flash-decoding (split-K): the page list of each request is cut into `num_splits` slices,
each slice is one program per (request, KV head) that keeps the whole GQA group of query
heads in the rows of its tiles, and `merge_splits_kernel` merges the slices by log-sum-exp
in one launch (no host sync: CUDA-graph safe). Given the step's output, the last launch
(the decode kernel itself when there is one slice) writes each request's row there in the
output's dtype.

The loop over key blocks is software-pipelined by Triton (keys and values through
asynchronous copies into shared memory, the page lookups a stage ahead). Deeper pipelines
buy nothing here: what limits the kernel is the per-block arithmetic (the key turn, layout
changes for the products) of too few programs per multiprocessor, so the defaults keep
programs small (DECODE_BLOCKS).

Small @triton.jit helpers here (`rope_halves`, `cos_sin`, `rotate`, `dot`) are shared with
triton_prefill.py.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# Keys per inner-loop block, warps, pipeline depth, keys turned in the input dtype (packed
# bf16/fp16 arithmetic: fewer registers than float32) and an optional register cap. What
# limits this kernel is how many programs share a multiprocessor (the loop's arithmetic is
# what a program waits on, not its loads): 64-key blocks of 2 warps, 2 stages and keys
# turned in bf16 take 185 registers and 41 KB of shared memory, 5 programs per SM, and ran
# at 4.05 TB/s on the H200 (90% of SDPA's dense decode, same run) against 3.51 for the
# H100's earlier best (128 keys, 4 warps, 3 stages, float32 turn: 2 programs per SM) and
# 1.5-2.4 for deeper pipelines (one program per SM); bench/results/bench_kernels.json,
# decode_tuning. The bf16 turn moves the error against the float32 reference from 2.3e-3
# to 2.9e-3 (tolerance 1.6e-2).
DECODE_BLOCKS = dict(block_keys=64, num_warps=2, num_stages=2, turn_in_input_dtype=True,
                     maxnreg=None)
# float32 operands (IEEE products): 32-key blocks fit without spills (sm_90 compile: 255
# registers, 60 KB of shared memory; 64 keys spill).
FLOAT32_DECODE_BLOCKS = dict(block_keys=32, num_warps=4, num_stages=3, turn_in_input_dtype=False,
                             maxnreg=None)
# Programs the launcher aims for per multiprocessor, reached by splitting each request's
# pages when batch * KV heads alone is smaller.
PROGRAMS_PER_SM = 4
# Multiprocessors assumed where the tensors are not on a GPU (the interpreter, compile
# tests): an H100's or H200's.
DEFAULT_MULTIPROCESSORS = 132
# tl.dot needs at least 16 rows; a GQA group smaller than that is padded.
MIN_DOT_ROWS = 16
# Masked logits: finite, so that exp2(m_old - m_new) of an all-masked block is 0, not NaN.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634  # 1 / ln(2): the kernels use exp2
# The last compiled launch (bench/ reads its n_regs and n_spills).
LAST_LAUNCH = None


@triton.jit
def rope_halves(HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    """Feature indices of the two members of each rotation pair, and their mask.

    neox (rotate-half): pair i is (i, i + HALF); GPT-J (interleaved): pair i is (2i, 2i + 1).
    """
    i = tl.arange(0, HALF_PAD)
    if IS_NEOX:
        first = i
        second = i + HALF
    else:
        first = 2 * i
        second = 2 * i + 1
    return first, second, i < HALF


@triton.jit
def load_stored_keys(src, ok, HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                     PASS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    """Keys as stored in their pages (src: each key's address; ok: keys to read, the rest 0):
    the two members of each rotation pair and the passthrough features (input dtype; k1 as
    a placeholder when PASS == 0, unused then)."""
    first, second, half_ok = rope_halves(HALF, HALF_PAD, IS_NEOX)
    mask = ok[:, None] & half_ok[None, :]
    k1 = tl.load(src[:, None] + first[None, :], mask=mask, other=0.0)
    k2 = tl.load(src[:, None] + second[None, :], mask=mask, other=0.0)
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        kp = tl.load(src[:, None] + 2 * HALF + p_idx[None, :],
                     mask=ok[:, None] & (p_idx < PASS)[None, :], other=0.0)
    else:
        kp = k1
    return k1, k2, kp


@triton.jit
def cos_sin(table_ptr, stride_table, angle, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos, sin: [len(angle), HALF_PAD] float32 of integer angles (negative: sin flips).

    Row |a| of the normalised table holds cos in [:HALF] and sin in [HALF:2*HALF].
    """
    i = tl.arange(0, HALF_PAD)
    row = table_ptr + tl.abs(angle).to(tl.int64)[:, None] * stride_table + i[None, :]
    mask = (i < HALF)[None, :]
    cos = tl.load(row, mask=mask, other=1.0)
    sin = tl.load(row + HALF, mask=mask, other=0.0)
    sin = tl.where(angle[:, None] < 0, -sin, sin)
    return cos, sin


@triton.jit
def per_key(x, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HALF_PAD: tl.constexpr):
    """[pages, HALF_PAD] -> [pages * B, HALF_PAD]: each page's cos (or sin) row for its keys.

    The table is read once per page, not once per key (16-32x fewer L2 reads).
    """
    x = tl.broadcast_to(x[:, None, :], [BLOCK_N // PAGE_SIZE, PAGE_SIZE, HALF_PAD])
    return tl.reshape(x, [BLOCK_N, HALF_PAD])


@triton.jit
def rotate(x1, x2, cos, sin):
    """One RoPE turn of each pair: y = [x1, x2] * [cos, cos] + [-x2, x1] * [sin, sin]."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def dot(a, b, acc=None):
    """tl.dot in the operands' own precision: IEEE float32 for float32 operands (Triton's
    default there is TF32, whose 10-bit mantissa would break the float32 contract)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def lambda_decode_kernel(
    # query [T_all, H, D]; kv_cache [blocks, Hkv, B, 2D]; table [L + 1, rotary_dim] f32
    q_ptr, kv_ptr, table_ptr,
    # TileGroup tensors: query_rows, query_position [N, 1]; page_block, page_base [N, P];
    # n_global, n_local [N] (each tile's request's own values)
    rows_ptr, pos_ptr, block_ptr, base_ptr, n_global_ptr, n_local_ptr,
    # outputs: out [N, S, H, D] f32 (normalised per slice), lse [N, S, H] f32 (log2 units);
    # or, TO_STEP_ROWS, the step's output [T_all, H, D] (one slice; lse unused)
    out_ptr, lse_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_table,
    stride_row_n, stride_pos_n, stride_page_n,
    stride_on, stride_os, stride_oh,
    stride_ln, stride_ls,
    num_pages, pages_per_split,
    scale_log2,                      # softmax scale * log2(e)
    trained_length,
    PAGE_SIZE: tl.constexpr,         # B
    GROUP: tl.constexpr,             # query heads per KV head
    GROUP_PAD: tl.constexpr,         # GROUP padded to >= 16 rows (a power of two)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr,              # rotary_dim / 2
    HALF_PAD: tl.constexpr,
    PASS: tl.constexpr,              # head_dim - rotary_dim: features RoPE leaves alone
    PASS_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_N: tl.constexpr,           # keys per inner block (a multiple of B)
    TO_STEP_ROWS: tl.constexpr,      # out is the step's output: row query_rows, its dtype
    TURN_IN_INPUT_DTYPE: tl.constexpr,
):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---- the query: one token, the GROUP heads that share this KV head ----
    t = tl.load(pos_ptr + n * stride_pos_n)                       # int64 scalar
    n_global = tl.load(n_global_ptr + n)
    n_local = tl.load(n_local_ptr + n)
    q_row = tl.load(rows_ptr + n * stride_row_n)
    head = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    q_base = q_ptr + q_row * stride_qt + head[:, None] * stride_qh
    first, second, half_ok = rope_halves(HALF, HALF_PAD, IS_NEOX)
    q_mask = head_ok[:, None] & half_ok[None, :]
    q1 = tl.load(q_base + first[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(q_base + second[None, :], mask=q_mask, other=0.0)
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        p_mask = head_ok[:, None] & (p_idx < PASS)[None, :]
        qp = tl.load(q_base + 2 * HALF + p_idx[None, :], mask=p_mask, other=0.0)
    dtype = q1.dtype
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    t_in_page = t % PAGE_SIZE

    m_i = tl.full([GROUP_PAD], NEG_BIG, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)

    page_lo = split * pages_per_split
    page_hi = tl.minimum(page_lo + pages_per_split, num_pages)
    key = tl.arange(0, BLOCK_N)
    for key_lo in range(page_lo * PAGE_SIZE, page_hi * PAGE_SIZE, BLOCK_N):
        # ---- phase 1: which keys, where, and the Λ mask ----
        page = (key_lo + key) // PAGE_SIZE
        offset = (key_lo + key) % PAGE_SIZE
        page_ok = page < page_hi
        block = tl.load(block_ptr + n * stride_page_n + page, mask=page_ok, other=0)
        base = tl.load(base_ptr + n * stride_page_n + page, mask=page_ok, other=-1)
        j = base + offset                                           # key positions
        visible = (page_ok & (base >= 0) & (j <= t)
                   & ((j < n_global) | (t - j < n_local)))
        # angle(t, p) = min(t - b_p, L) - t mod B, one per page of the block (padding pages
        # have b_p = -1, which still gives an angle inside the table); keys turn by -angle
        block_page = key_lo // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        page_base = tl.load(base_ptr + n * stride_page_n + block_page,
                            mask=block_page < page_hi, other=-1)
        angle = tl.minimum(t - page_base, trained_length) - t_in_page
        cos, sin = cos_sin(table_ptr, stride_table, -angle, HALF, HALF_PAD)
        if TURN_IN_INPUT_DTYPE:
            cos, sin = cos.to(dtype), sin.to(dtype)
        cos = per_key(cos, PAGE_SIZE, BLOCK_N, HALF_PAD)
        sin = per_key(sin, PAGE_SIZE, BLOCK_N, HALF_PAD)

        # ---- phase 2: load keys, turn them, logits ----
        k_base = (kv_ptr + block.to(tl.int64) * stride_kb + kv_head * stride_kh
                  + offset * stride_ks)
        k1, k2, kp = load_stored_keys(k_base, visible, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
        if TURN_IN_INPUT_DTYPE:
            k1, k2 = rotate(k1, k2, cos, sin)
        else:
            k1, k2 = rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
        s = dot(q1, tl.trans(k1.to(dtype)))
        s = dot(q2, tl.trans(k2.to(dtype)), s)
        if PASS > 0:
            s = dot(qp, tl.trans(kp), s)
        s = tl.where(visible[None, :], s * scale_log2, float("-inf"))

        # ---- phase 3: online softmax, accumulate values ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(k_base[:, None] + HEAD_DIM + d[None, :],
                    mask=visible[:, None] & d_ok[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # ---- write this slice: normalised output and its log2-sum-exp ----
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if TO_STEP_ROWS:
        out_base = out_ptr + q_row * stride_on + head[:, None] * stride_oh
        tl.store(out_base + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=head_ok[:, None] & d_ok[None, :])
    else:
        out_base = out_ptr + n * stride_on + split * stride_os + head[:, None] * stride_oh
        tl.store(out_base + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + n * stride_ln + split * stride_ls + head, lse, mask=head_ok)


@triton.jit
def merge_splits_kernel(
    part_ptr, lse_ptr,               # the slices: [N, S, H, D] f32 (normalised), [N, S, H]
    out_ptr,                         # [N, 1, H, D] f32, or the step's output [T_all, H, D]
    rows_ptr,                        # query_rows [N, 1] (TO_STEP_ROWS)
    stride_pn, stride_ps, stride_ph, stride_ln, stride_ls, stride_on, stride_oh, stride_row_n,
    num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    TO_STEP_ROWS: tl.constexpr,
):
    """One (request, query head): the slices weighted by 2^lse / sum 2^lse (empty slices,
    lse = -inf, weigh 0)."""
    n = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.arange(0, SPLITS_PAD)
    split_ok = split < num_splits
    lse = tl.load(lse_ptr + n * stride_ln + split * stride_ls + head, mask=split_ok,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - top))
    total = tl.sum(weight, 0)
    weight = weight / tl.where(total == 0.0, 1.0, total)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    part = tl.load(part_ptr + n * stride_pn + split[:, None] * stride_ps + head * stride_ph
                   + d[None, :], mask=split_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0)
    if TO_STEP_ROWS:
        row = tl.load(rows_ptr + n * stride_row_n)
        tl.store(out_ptr + row * stride_on + head * stride_oh + d,
                 out.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        tl.store(out_ptr + n * stride_on + head * stride_oh + d, out, mask=d_ok)


def _pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def check_inputs(config, group, query, kv_cache, rotation, *, decode: bool) -> None:
    """Shape, dtype, device and stride contract shared by both launchers (clear errors)."""
    who = "triton_decode" if decode else "triton_prefill"
    if kv_cache.dim() == 4 and kv_cache.shape[2] != config.page_size:
        raise ValueError(f"lminf {who}: kv_cache page size {kv_cache.shape[2]} != "
                         f"config.page_size {config.page_size}")
    if query.dim() != 3 or kv_cache.dim() != 4:
        raise ValueError(f"lminf {who}: query must be [T, H, D] and kv_cache "
                         f"[blocks, Hkv, B, 2D]; got {tuple(query.shape)} and "
                         f"{tuple(kv_cache.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    if kv_cache.shape[3] != 2 * head_dim:
        raise ValueError(f"lminf {who}: kv_cache last dim {kv_cache.shape[3]} != 2 * "
                         f"head_dim ({2 * head_dim})")
    if num_heads % num_kv_heads:
        raise ValueError(f"lminf {who}: {num_heads} query heads is not a multiple of "
                         f"{num_kv_heads} KV heads")
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"lminf {who}: query dtype {query.dtype} != kv_cache dtype "
                         f"{kv_cache.dtype}")
    if query.stride(2) != 1 or kv_cache.stride(3) != 1:
        raise ValueError(f"lminf {who}: the head_dim axis of query and kv_cache must be "
                         f"contiguous (strides {query.stride()} / {kv_cache.stride()})")
    if rotation.rotary_dim > head_dim or rotation.rotary_dim % 2:
        raise ValueError(f"lminf {who}: rotary_dim {rotation.rotary_dim} must be even and "
                         f"<= head_dim {head_dim}")
    table = rotation.cos_sin
    if table.dtype != torch.float32 or table.stride(1) != 1 or table.dim() != 2:
        raise ValueError(f"lminf {who}: rotation.cos_sin must be a row-contiguous float32 "
                         f"[L + 1, rotary_dim] table")
    tensors = (query, kv_cache, table, group.query_rows, group.query_position,
               group.page_block, group.page_base, group.n_global, group.n_local)
    if any(x.device != query.device for x in tensors):
        raise ValueError(f"lminf {who}: query, kv_cache, rotation table and plan tensors "
                         f"must be on one device ({[str(x.device) for x in tensors]})")
    for name in ("query_rows", "query_position", "page_block", "page_base"):
        x = getattr(group, name)
        if x.dim() != 2 or x.stride(1) != 1:
            raise ValueError(f"lminf {who}: group.{name} must be a 2-D tensor with a "
                             f"contiguous last axis, got shape {tuple(x.shape)} strides "
                             f"{x.stride()}")
    num_tiles = group.query_rows.shape[0]
    for name in ("n_global", "n_local"):
        x = getattr(group, name)
        if x.shape != (num_tiles,) or (num_tiles > 1 and x.stride(0) != 1):
            raise ValueError(f"lminf {who}: group.{name} must be a contiguous [N] tensor "
                             f"(one value per tile, N = {num_tiles}), got shape "
                             f"{tuple(x.shape)} strides {x.stride()}")
    if group.page_block.shape != group.page_base.shape or \
            group.query_rows.shape != group.query_position.shape:
        raise ValueError(f"lminf {who}: page_block/page_base and query_rows/query_position "
                         "shapes must match")
    if decode and group.query_rows.shape[1] != 1:
        raise ValueError(f"lminf {who}: decode groups have one query per tile, got "
                         f"{group.query_rows.shape[1]}")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


def attend_group(plan, group, query: torch.Tensor, kv_cache: torch.Tensor, rotation,
                 scale: float, num_splits: int | None = None,
                 output: torch.Tensor | None = None, **blocks) -> torch.Tensor:
    """Decode Λ-attention of one T == 1 group; same contract as reference.attend_group.

    query: [T_all, H, D]; kv_cache: [blocks, Hkv, B, 2D]; returns [N, 1, H, D] float32, or,
    given the step's output [T_all, H, D], writes each request's row there in its dtype and
    returns it. num_splits: slices of each request's pages (default: enough to give every
    multiprocessor PROGRAMS_PER_SM programs); blocks: any of DECODE_BLOCKS' keys.
    """
    check_inputs(plan.config, group, query, kv_cache, rotation, decode=True)
    unknown = set(blocks) - set(DECODE_BLOCKS)
    if unknown:
        raise TypeError(f"lminf triton_decode: unknown block arguments {sorted(unknown)}")
    shape = dict(FLOAT32_DECODE_BLOCKS if query.dtype == torch.float32 else DECODE_BLOCKS,
                 **blocks)
    config = plan.config
    page_size = kv_cache.shape[2]
    block_keys = page_size * max(1, shape["block_keys"] // page_size)
    num_tiles, num_pages = group.page_block.shape
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    group_size = num_heads // num_kv_heads
    if num_splits is None:
        target = PROGRAMS_PER_SM * _multiprocessors(query.device)
        num_splits = max(1, min(-(-num_pages // (block_keys // page_size)),
                                target // max(1, num_tiles * num_kv_heads)))
    pages_per_split = max(1, -(-num_pages // num_splits))
    num_splits = max(1, -(-num_pages // pages_per_split))
    if output is not None and (output.shape != query.shape or output.device != query.device
                               or not output.is_floating_point() or output.stride(2) != 1):
        raise ValueError(f"lminf triton_decode: output must be a floating [T, H, D] tensor "
                         f"like query {tuple(query.shape)} on {query.device} with contiguous "
                         f"features, got {tuple(output.shape)} {output.dtype} on "
                         f"{output.device}")
    to_step_rows = output is not None and num_splits == 1
    if to_step_rows:
        part, lse = output, output  # lse is not written when the kernel stores rows
        part_strides = (output.stride(0), 0, output.stride(1))
    else:
        part = torch.empty(num_tiles, num_splits, num_heads, head_dim, device=query.device,
                           dtype=torch.float32)
        lse = torch.empty(num_tiles, num_splits, num_heads, device=query.device,
                          dtype=torch.float32)
        part_strides = part.stride()[:3]
    if num_tiles == 0:
        return output if output is not None else part[:, :1]
    half = rotation.rotary_dim // 2
    passthrough = head_dim - rotation.rotary_dim
    global LAST_LAUNCH
    LAST_LAUNCH = lambda_decode_kernel[(num_tiles, num_kv_heads, num_splits)](
        query, kv_cache, rotation.cos_sin,
        group.query_rows, group.query_position, group.page_block, group.page_base,
        group.n_global, group.n_local,
        part, lse,
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        rotation.cos_sin.stride(0),
        group.query_rows.stride(0), group.query_position.stride(0), group.page_block.stride(0),
        *part_strides,
        lse.stride(0), lse.stride(1) if lse.dim() > 1 else 0,
        num_pages, pages_per_split,
        scale * LOG2E,
        config.trained_length,
        PAGE_SIZE=page_size, GROUP=group_size, GROUP_PAD=_pow2(group_size, MIN_DOT_ROWS),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16),
        HALF=half, HALF_PAD=_pow2(half, 16),
        PASS=passthrough, PASS_PAD=_pow2(passthrough, 16),
        IS_NEOX=bool(rotation.is_neox_style), BLOCK_N=block_keys, TO_STEP_ROWS=to_step_rows,
        TURN_IN_INPUT_DTYPE=shape["turn_in_input_dtype"],
        num_warps=shape["num_warps"], num_stages=shape["num_stages"],
        **({"maxnreg": shape["maxnreg"]} if shape["maxnreg"] else {}),
    )
    if to_step_rows:
        return output
    if num_splits == 1:
        return part
    if output is None:
        out = torch.empty(num_tiles, 1, num_heads, head_dim, device=query.device,
                          dtype=torch.float32)
        out_strides = (out.stride(0), out.stride(2))
    else:
        out, out_strides = output, (output.stride(0), output.stride(1))
    merge_splits_kernel[(num_tiles, num_heads)](
        part, lse, out, group.query_rows,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        *out_strides, group.query_rows.stride(0),
        num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16), SPLITS_PAD=_pow2(num_splits, 2),
        TO_STEP_ROWS=output is not None,
    )
    return out
