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

Flash-decoding: the page list of each request is cut into `num_splits` slices, each slice
is one program per (request, KV head) that keeps the whole GQA group of query heads in the
rows of its tiles, and the launcher merges the slices by log-sum-exp in PyTorch (no host
sync: CUDA-graph safe).

Small @triton.jit helpers here (`rope_halves`, `cos_sin`, `rotate`) are shared with
triton_prefill.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Keys per inner-loop block: 128 keys of 128 dims in bf16 are 32 KB of K plus 32 KB of V in
# flight per program; measured best on the H100 (64: 2.1 TB/s, 128: 2.9, 256 spills: 1.3;
# bench/results/bench_kernels.json).
DECODE_BLOCK_KEYS = 128
# Programs the launcher aims for (about 4 per SM of an H100's 132), reached by splitting
# each request's pages when batch * KV heads alone is smaller.
TARGET_PROGRAMS = 528
# tl.dot needs at least 16 rows; a GQA group smaller than that is padded.
MIN_DOT_ROWS = 16
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
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
def lambda_decode_kernel(
    # query [T_all, H, D]; kv_cache [blocks, Hkv, B, 2D]; table [L + 1, rotary_dim] f32
    q_ptr, kv_ptr, table_ptr,
    # TileGroup tensors: query_rows, query_position [N, 1]; page_block, page_base [N, P]
    rows_ptr, pos_ptr, block_ptr, base_ptr,
    # outputs: out [N, S, H, D] f32 (normalised per slice), lse [N, S, H] f32 (log2 units)
    out_ptr, lse_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_table,
    stride_row_n, stride_pos_n, stride_page_n,
    stride_on, stride_os, stride_oh,
    stride_ln, stride_ls,
    num_pages, pages_per_split,
    scale_log2,                      # softmax scale * log2(e)
    n_global, n_local, trained_length,
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
):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---- the query: one token, the GROUP heads that share this KV head ----
    t = tl.load(pos_ptr + n * stride_pos_n)                       # int64 scalar
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
        cos = per_key(cos, PAGE_SIZE, BLOCK_N, HALF_PAD)
        sin = per_key(sin, PAGE_SIZE, BLOCK_N, HALF_PAD)

        # ---- phase 2: load keys, turn them, logits ----
        k_base = (kv_ptr + block.to(tl.int64) * stride_kb + kv_head * stride_kh
                  + offset * stride_ks)
        k1, k2, kp = load_stored_keys(k_base, visible, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
        k1, k2 = rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
        s = tl.dot(q1, tl.trans(k1.to(dtype)))
        s += tl.dot(q2, tl.trans(k2.to(dtype)))
        if PASS > 0:
            s += tl.dot(qp, tl.trans(kp))
        s = tl.where(visible[None, :], s * scale_log2, float("-inf"))

        # ---- phase 3: online softmax, accumulate values ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(k_base[:, None] + HEAD_DIM + d[None, :],
                    mask=visible[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # ---- write this slice: normalised output and its log2-sum-exp ----
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_base = out_ptr + n * stride_on + split * stride_os + head[:, None] * stride_oh
    tl.store(out_base + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + n * stride_ln + split * stride_ls + head, lse, mask=head_ok)


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
               group.page_block, group.page_base)
    if any(x.device != query.device for x in tensors):
        raise ValueError(f"lminf {who}: query, kv_cache, rotation table and plan tensors "
                         f"must be on one device ({[str(x.device) for x in tensors]})")
    for name in ("query_rows", "query_position", "page_block", "page_base"):
        x = getattr(group, name)
        if x.dim() != 2 or x.stride(1) != 1:
            raise ValueError(f"lminf {who}: group.{name} must be a 2-D tensor with a "
                             f"contiguous last axis, got shape {tuple(x.shape)} strides "
                             f"{x.stride()}")
    if group.page_block.shape != group.page_base.shape or \
            group.query_rows.shape != group.query_position.shape:
        raise ValueError(f"lminf {who}: page_block/page_base and query_rows/query_position "
                         "shapes must match")
    if decode and group.query_rows.shape[1] != 1:
        raise ValueError(f"lminf {who}: decode groups have one query per tile, got "
                         f"{group.query_rows.shape[1]}")


def attend_group(plan, group, query: torch.Tensor, kv_cache: torch.Tensor, rotation,
                 scale: float, num_splits: int | None = None,
                 block_keys: int = DECODE_BLOCK_KEYS) -> torch.Tensor:
    """Decode Λ-attention of one T == 1 group; same contract as reference.attend_group.

    query: [T_all, H, D]; kv_cache: [blocks, Hkv, B, 2D]; returns [N, 1, H, D] float32.
    """
    check_inputs(plan.config, group, query, kv_cache, rotation, decode=True)
    config = plan.config
    page_size = kv_cache.shape[2]
    if block_keys % page_size:
        block_keys = page_size * max(1, block_keys // page_size)
    num_tiles, num_pages = group.page_block.shape
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    group_size = num_heads // num_kv_heads
    if num_splits is None:
        pages_per_block = block_keys // page_size
        num_splits = max(1, min(-(-num_pages // pages_per_block),
                                TARGET_PROGRAMS // max(1, num_tiles * num_kv_heads)))
    pages_per_split = max(1, -(-num_pages // num_splits))
    num_splits = max(1, -(-num_pages // pages_per_split))

    out = torch.empty(num_tiles, num_splits, num_heads, head_dim, device=query.device,
                      dtype=torch.float32)
    lse = torch.empty(num_tiles, num_splits, num_heads, device=query.device,
                      dtype=torch.float32)
    if num_tiles == 0:
        return out[:, :1]
    half = rotation.rotary_dim // 2
    passthrough = head_dim - rotation.rotary_dim
    global LAST_LAUNCH
    LAST_LAUNCH = lambda_decode_kernel[(num_tiles, num_kv_heads, num_splits)](
        query, kv_cache, rotation.cos_sin,
        group.query_rows, group.query_position, group.page_block, group.page_base,
        out, lse,
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        rotation.cos_sin.stride(0),
        group.query_rows.stride(0), group.query_position.stride(0), group.page_block.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        num_pages, pages_per_split,
        scale * LOG2E,
        config.n_global, config.n_local, config.trained_length,
        PAGE_SIZE=page_size, GROUP=group_size, GROUP_PAD=_pow2(group_size, MIN_DOT_ROWS),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16),
        HALF=half, HALF_PAD=_pow2(half, 16),
        PASS=passthrough, PASS_PAD=_pow2(passthrough, 16),
        IS_NEOX=bool(rotation.is_neox_style), BLOCK_N=block_keys,
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
    )
    if num_splits == 1:
        return out
    # log-sum-exp merge of the slices (an empty slice has lse = -inf and weight 0)
    weight = torch.softmax(lse * math.log(2.0), dim=1).nan_to_num_(0.0)  # [N, S, H]
    return (out * weight[..., None]).sum(dim=1, keepdim=True)
