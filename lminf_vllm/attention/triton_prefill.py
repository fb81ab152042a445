"""Triton Λ-attention chunked prefill: a tile of queries against its pinned pages and ring.

Reads the same TileGroup as `reference.attend_group` (any T; the chunk's own keys are already
in the cache) and computes the same function (DESIGN §2-3). Per (query t, page p) the query
must turn by angle(t, p) = min(t - b_p, L) - t mod B before its dot products with the page's
keys. Doing that per (query, page) would put a rotation of the whole query block in the inner
loop; instead every (t, p) falls in one of two cases, each a plain matrix product:

  exact  (t - b_p <= L): angle = (t - t mod B - a) + (a - b_p) for the tile's anchor
         a = B * floor(t_first / B). The query turns by the first term once per tile
         (q_exact), each key by -(a - b_p) once per block, and
         <R(angle) q, k> = <R(t - t mod B - a) q, R(b_p - a) k>.
  capped (t - b_p >  L): angle = L - t mod B, independent of the page: the query turns once
         per tile (q_capped) and the keys are used as stored.

Every angle stays in [-L, L]: t - t mod B - a < BLOCK_M + B <= L (the launcher checks), and
a - b_p <= t - b_p <= L wherever the exact case is used. A block computes only the case(s)
its pairs need: pages some query sees past L always form a prefix of the tile's
page list (the global pages, then the oldest window pages), so a first loop over that prefix
computes both cases and picks per pair, and a second loop over the rest computes only the
exact case (and holds no capped queries in registers). The Λ mask is
rope_frame.visible, evaluated on positions relative to the anchor (int32, with far keys
clamped, which keeps them far).

Two launches of the kernel (PHASE 0: the capped prefix, PHASE 1: the exact rest, which
continues from phase 0's normalised output and log-sum-exp) keep the capped-case queries out
of the main loop's registers. One program per (tile, query head, BLOCK_M rows of the tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lminf_vllm.attention.triton_decode import (LOG2E, NEG_BIG, _pow2, check_inputs, cos_sin,
                                                 per_key, rope_halves, rotate)

# Query rows per program: 128 matches the plan's default tile height, so a tile is one
# program per head; smaller tiles (the last of a chunk) use the next power of two >= 16.
PREFILL_BLOCK_M = 128
# Keys per inner block and warps: the best of the H100 sweep in bench/bench_kernels.py
# (bench/results/bench_kernels.json); larger blocks spill registers.
PREFILL_BLOCK_N = 32
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2
# Positions are compared relative to the tile's anchor in int32; a key farther back than
# this is clamped to it, which keeps it outside the window and past the distance limit.
FAR = tl.constexpr(1 << 30)
# Pages per step of the scan that counts the capped prefix of a tile's page list.
CAPPED_SCAN = tl.constexpr(128)
# The last compiled launch (bench/ reads its n_regs and n_spills).
LAST_LAUNCH = None


@triton.jit
def attend_block(acc, m_i, l_i, key_lo, n, kv_head, num_pages,
                 qe1, qe2, qc1, qc2, qp, t_rel, row_ok, anchor,
                 kv_ptr, table_ptr, block_ptr, base_ptr,
                 stride_kb, stride_kh, stride_ks, stride_table, stride_page_n,
                 scale_log2, n_global, n_local, trained_length,
                 PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                 PASS_PAD: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAPPED: tl.constexpr):
    """One block of BLOCK_N keys (whole pages) into the online softmax of BLOCK_M queries.

    CAPPED: the block may hold (query, page) pairs past the distance limit; computes both
    cases and picks per pair. Otherwise every pair is exact (the caller guarantees it).
    """
    first, second, half_ok = rope_halves(HALF, HALF_PAD, IS_NEOX)
    # ---- phase 1: which keys, where, and the Λ mask ----
    key = key_lo + tl.arange(0, BLOCK_N)
    page = key // PAGE_SIZE
    offset = key % PAGE_SIZE
    page_ok = page < num_pages
    block = tl.load(block_ptr + n * stride_page_n + page, mask=page_ok, other=0)
    base = tl.load(base_ptr + n * stride_page_n + page, mask=page_ok, other=-1)
    key_ok = page_ok & (base >= 0)
    is_global = (base + offset) < n_global
    j_rel = (tl.maximum(base - anchor, -FAR) + offset).to(tl.int32)
    # a block every query sees whole (all rows and keys real, causal, inside the window or
    # global) skips the per-pair mask: most blocks of a long window
    t_lo = tl.min(tl.where(row_ok, t_rel, FAR))
    t_hi = tl.max(tl.where(row_ok, t_rel, -FAR))
    j_lo = tl.min(tl.where(key_ok, j_rel, FAR))
    j_hi = tl.max(tl.where(key_ok, j_rel, -FAR))
    whole = ((tl.min(row_ok.to(tl.int32)) == 1) & (tl.min(key_ok.to(tl.int32)) == 1)
             & (t_lo - j_hi >= 0)
             & ((t_hi - j_lo < n_local) | (tl.min(is_global.to(tl.int32)) == 1)))

    # ---- phase 2: keys, logits ----
    k_base = (kv_ptr + block.to(tl.int64) * stride_kb + kv_head * stride_kh
              + offset * stride_ks)
    k_mask = key_ok[:, None] & half_ok[None, :]
    k1 = tl.load(k_base[:, None] + first[None, :], mask=k_mask, other=0.0)
    k2 = tl.load(k_base[:, None] + second[None, :], mask=k_mask, other=0.0)
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        kp = tl.load(k_base[:, None] + 2 * HALF + p_idx[None, :],
                     mask=key_ok[:, None] & (p_idx < PASS)[None, :], other=0.0)
        s_pass = tl.dot(qp, tl.trans(kp))
    else:
        s_pass = tl.zeros([qe1.shape[0], BLOCK_N], tl.float32)
    # exact case: keys turn by b_p - a, one angle per page (clamped where unused)
    block_page = key_lo // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
    page_base = tl.load(base_ptr + n * stride_page_n + block_page,
                        mask=block_page < num_pages, other=-1)
    key_angle = tl.minimum(tl.maximum(page_base - anchor, -trained_length), trained_length)
    kcos, ksin = cos_sin(table_ptr, stride_table, key_angle, HALF, HALF_PAD)
    kcos = per_key(kcos, PAGE_SIZE, BLOCK_N, HALF_PAD)
    ksin = per_key(ksin, PAGE_SIZE, BLOCK_N, HALF_PAD)
    ke1, ke2 = rotate(k1.to(tl.float32), k2.to(tl.float32), kcos, ksin)
    s = s_pass + tl.dot(qe1, tl.trans(ke1.to(k1.dtype)))
    s += tl.dot(qe2, tl.trans(ke2.to(k1.dtype)))
    if CAPPED:
        # capped case: queries turned by L - t mod B, keys as stored
        s_capped = s_pass + tl.dot(qc1, tl.trans(k1))
        s_capped += tl.dot(qc2, tl.trans(k2))
        base_rel = tl.maximum(base - anchor, -FAR).to(tl.int32)
        exact = (t_rel[:, None] - base_rel[None, :]) <= trained_length
        s = tl.where(exact, s, s_capped)
    if whole:
        s = s * scale_log2
    else:
        dist = t_rel[:, None] - j_rel[None, :]                  # t - j
        visible = (row_ok[:, None] & key_ok[None, :] & (dist >= 0)
                   & (is_global[None, :] | (dist < n_local)))
        s = tl.where(visible, s * scale_log2, float("-inf"))

    # ---- phase 3: online softmax, accumulate values ----
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    d = tl.arange(0, HEAD_DIM_PAD)
    v = tl.load(k_base[:, None] + HEAD_DIM + d[None, :],
                mask=key_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def lambda_prefill_kernel(
    # query [T_all, H, D]; kv_cache [blocks, Hkv, B, 2D]; table [L + 1, rotary_dim] f32
    q_ptr, kv_ptr, table_ptr,
    # TileGroup tensors: query_rows, query_position [N, T]; page_block, page_base [N, P]
    rows_ptr, pos_ptr, block_ptr, base_ptr,
    out_ptr,                         # [N, T, H, D] float32
    lse_ptr,                         # [N, T, H] float32: phase 0 -> phase 1 (log2 units)
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_table,
    stride_row_n, stride_pos_n, stride_page_n,
    stride_on, stride_ot, stride_oh,
    stride_ln, stride_lt,
    num_queries, num_pages,
    scale_log2,                      # softmax scale * log2(e)
    n_global, n_local, trained_length,
    PAGE_SIZE: tl.constexpr,         # B
    GROUP: tl.constexpr,             # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr,              # rotary_dim / 2
    HALF_PAD: tl.constexpr,
    PASS: tl.constexpr,              # head_dim - rotary_dim
    PASS_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_M: tl.constexpr,           # query rows per program
    BLOCK_N: tl.constexpr,           # keys per inner block (a multiple of B)
    PHASE: tl.constexpr,             # 0: the capped prefix of the page list; 1: the rest
):
    n = tl.program_id(0)
    head = tl.program_id(1)
    row_block = tl.program_id(2)
    kv_head = head // GROUP

    # ---- the tile's queries and their two rotations ----
    m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = m < num_queries
    t_first = tl.load(pos_ptr + n * stride_pos_n + row_block * BLOCK_M)
    t = tl.load(pos_ptr + n * stride_pos_n + m, mask=row_ok, other=t_first)
    q_row = tl.load(rows_ptr + n * stride_row_n + m, mask=row_ok, other=0)
    anchor = t_first - t_first % PAGE_SIZE
    t_in_page = (t % PAGE_SIZE).to(tl.int32)
    t_rel = (t - anchor).to(tl.int32)                       # in [0, BLOCK_M + B)

    first, second, half_ok = rope_halves(HALF, HALF_PAD, IS_NEOX)
    q_base = q_ptr + q_row.to(tl.int64)[:, None] * stride_qt + head * stride_qh
    q_mask = row_ok[:, None] & half_ok[None, :]
    q1 = tl.load(q_base + first[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(q_base + second[None, :], mask=q_mask, other=0.0)
    dtype = q1.dtype
    q1 = q1.to(tl.float32)
    q2 = q2.to(tl.float32)
    cos, sin = cos_sin(table_ptr, stride_table, t_rel - t_in_page, HALF, HALF_PAD)
    qe1, qe2 = rotate(q1, q2, cos, sin)                     # exact case
    qe1 = qe1.to(dtype)
    qe2 = qe2.to(dtype)
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        qp = tl.load(q_base + 2 * HALF + p_idx[None, :],
                     mask=row_ok[:, None] & (p_idx < PASS)[None, :], other=0.0)
    else:
        qp = qe1  # unused

    # ---- where the work lies in the tile's page list (global pages, then window pages in
    # order, padding last): the pages some query sees past L form a prefix, and pages
    # past the last query are never visible ----
    t_last_rel = tl.max(tl.where(row_ok, t_rel, 0))
    num_capped = 0
    num_useful = 0
    for page_lo in range(0, num_pages, CAPPED_SCAN):
        page = page_lo + tl.arange(0, CAPPED_SCAN)
        base = tl.load(base_ptr + n * stride_page_n + page, mask=page < num_pages, other=-1)
        base_rel = tl.maximum(base - anchor, -FAR)
        far = (base >= 0) & (t_last_rel - base_rel > trained_length)
        num_capped += tl.sum(far.to(tl.int32))
        num_useful += tl.sum(((base >= 0) & (base_rel <= t_last_rel)).to(tl.int32))
    capped_end = tl.cdiv(num_capped * PAGE_SIZE, BLOCK_N) * BLOCK_N

    d = tl.arange(0, HEAD_DIM_PAD)
    row_d_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    out_base = out_ptr + n * stride_on + m[:, None] * stride_ot + head * stride_oh
    lse_base = lse_ptr + n * stride_ln + m * stride_lt + head
    if PHASE == 0:
        # the capped prefix: both cases, picked per pair
        cos, sin = cos_sin(table_ptr, stride_table, trained_length - t_in_page, HALF, HALF_PAD)
        qc1, qc2 = rotate(q1, q2, cos, sin)
        qc1 = qc1.to(dtype)
        qc2 = qc2.to(dtype)
        m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        for key_lo in range(0, capped_end, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, key_lo, n, kv_head, num_pages, qe1, qe2, qc1, qc2, qp, t_rel,
                row_ok, anchor, kv_ptr, table_ptr, block_ptr, base_ptr,
                stride_kb, stride_kh, stride_ks, stride_table, stride_page_n,
                scale_log2, n_global, n_local, trained_length,
                PAGE_SIZE, HEAD_DIM, HEAD_DIM_PAD, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX,
                BLOCK_N, True)
        empty = l_i == 0.0
        tl.store(out_base + d[None, :], acc / tl.where(empty, 1.0, l_i)[:, None],
                 mask=row_d_ok)
        tl.store(lse_base, tl.where(empty, NEG_BIG, m_i + tl.log2(tl.where(empty, 1.0, l_i))),
                 mask=row_ok)
    else:
        # the exact rest, continuing from phase 0's (normalised output, log2-sum-exp):
        # (m, l, acc) = (lse, 1, out) is the same partial softmax
        m_i = tl.load(lse_base, mask=row_ok, other=NEG_BIG)
        l_i = tl.where(m_i > NEG_BIG, 1.0, 0.0)
        acc = tl.load(out_base + d[None, :], mask=row_d_ok, other=0.0)
        useful_end = tl.minimum(num_useful * PAGE_SIZE, num_pages * PAGE_SIZE)
        for key_lo in range(capped_end, useful_end, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, key_lo, n, kv_head, num_pages, qe1, qe2, qe1, qe2, qp, t_rel,
                row_ok, anchor, kv_ptr, table_ptr, block_ptr, base_ptr,
                stride_kb, stride_kh, stride_ks, stride_table, stride_page_n,
                scale_log2, n_global, n_local, trained_length,
                PAGE_SIZE, HEAD_DIM, HEAD_DIM_PAD, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX,
                BLOCK_N, False)
        tl.store(out_base + d[None, :], acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None],
                 mask=row_d_ok)


def attend_group(plan, group, query: torch.Tensor, kv_cache: torch.Tensor, rotation,
                 scale: float, block_m: int = PREFILL_BLOCK_M, block_n: int = PREFILL_BLOCK_N,
                 num_warps: int = PREFILL_NUM_WARPS,
                 num_stages: int = PREFILL_NUM_STAGES) -> torch.Tensor:
    """Prefill Λ-attention of one group; same contract as reference.attend_group.

    query: [T_all, H, D]; kv_cache: [blocks, Hkv, B, 2D]; returns [N, T, H, D] float32.
    """
    check_inputs(group, query, kv_cache, rotation, decode=False)
    config = plan.config
    page_size = kv_cache.shape[2]
    if page_size != config.page_size:
        raise ValueError(f"lminf triton_prefill: kv_cache page size {page_size} != "
                         f"config.page_size {config.page_size}")
    num_tiles, num_queries = group.query_rows.shape
    num_pages = group.page_block.shape[1]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    block_m = min(block_m, _pow2(num_queries, 16))
    # the exact case turns queries by up to BLOCK_M + B - 1: that must be a table row
    while block_m > 16 and block_m + page_size - 1 > config.trained_length:
        block_m //= 2
    if block_m + page_size - 1 > config.trained_length:
        raise ValueError(f"lminf triton_prefill: trained_length {config.trained_length} is "
                         f"too short for pages of {page_size} (needs >= {16 + page_size - 1})")
    block_n = max(page_size, block_n - block_n % page_size)
    out = torch.empty(num_tiles, num_queries, num_heads, head_dim, device=query.device,
                      dtype=torch.float32)
    if num_tiles == 0 or num_queries == 0:
        return out
    half = rotation.rotary_dim // 2
    passthrough = head_dim - rotation.rotary_dim
    lse = torch.empty(num_tiles, num_queries, num_heads, device=query.device,
                      dtype=torch.float32)
    grid = (num_tiles, num_heads, -(-num_queries // block_m))
    global LAST_LAUNCH
    for phase in (0, 1):  # stream-ordered: phase 1 reads what phase 0 wrote
        LAST_LAUNCH = lambda_prefill_kernel[grid](
            query, kv_cache, rotation.cos_sin,
            group.query_rows, group.query_position, group.page_block, group.page_base,
            out, lse,
            query.stride(0), query.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            rotation.cos_sin.stride(0),
            group.query_rows.stride(0), group.query_position.stride(0),
            group.page_block.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            num_queries, num_pages,
            scale * LOG2E,
            config.n_global, config.n_local, config.trained_length,
            PAGE_SIZE=page_size, GROUP=num_heads // num_kv_heads,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16),
            HALF=half, HALF_PAD=_pow2(half, 16),
            PASS=passthrough, PASS_PAD=_pow2(passthrough, 16),
            IS_NEOX=bool(rotation.is_neox_style), BLOCK_M=block_m, BLOCK_N=block_n,
            PHASE=phase, num_warps=num_warps, num_stages=num_stages,
        )
    return out
