"""Triton Λ-attention chunked prefill: a tile of queries against its pinned pages and ring.

Reads the same TileGroup as `reference.attend_group` (any T; the chunk's own keys are already
in the cache) and computes the same function (DESIGN §2-3). Per (query t, page p) the query
must turn by angle(t, p) = min(t - b_p, L) - t mod B before its dot products with the page's
keys (stored turned by j - b_p). Every (t, p) falls in one of two cases:

  exact  (t - b_p <= L): the logit is plain RoPE at distance t - j. With the tile's anchor
         a = B * floor(t_first / B): <R(t - t mod B - a) q, R(b_p - a) k>.
  capped (t - b_p >  L): angle = L - t mod B, independent of the page: the query turns once
         and the keys are used as stored.

Two launches per group:

1. `turn_pages_kernel` turns each key of the tile's page list once per step by b_p - a into
   a dense [tile, KV head, slot, :] copy, beside a dense copy of the values (slots not written
   yet are zeros). This is the one place a key is turned (not once per query head and row
   block in the inner loop).
2. `lambda_prefill_kernel`, one program per (BLOCK_M rows, PACK query heads of one KV head,
   tile): its rows are (query, head) pairs, BLOCK_M / PACK queries times PACK heads
   (`pack_heads`), so that a program's queries span fewer positions and the window's masked
   edges are narrower. It turns the queries (exact and capped) and visits the keys in the
   page list's order:
   * global pages every row is past L for: the capped product alone (`attend_far_global`;
     or, `far_dense`, with the pages every query of the tile is past L for copied as stored
     into the dense copy by step 1, from there: `attend_far_global_dense`, no page lookups);
     the other global pages: both cases per pair (`attend_general`);
   * window pages (contiguous positions) from the first key any row sees:
     - pages some row sees past L (the oldest, only when n_local > L - B + 1): their capped
       pairs from the dense copy (`attend_window_capped`: since n_local <= L, a row's
       capped pairs lie in one page, so a third turn of the query covers them; no page
       lookups), either in a loop of their own or (`merge_capped`) inside the far edge's
       masked blocks, which then compute both cases from one load (`attend_window_both`);
     - then the exact case from the dense copy: masked at the window's far edge, unmasked
       in the middle (plain flash attention: most of a long window), masked on the diagonal
       (the masked runs in narrower blocks than the unmasked one); or (`causal_loop`) after
       the far edge one loop to the diagonal whose blocks are masked (j <= t) only where
       they reach past the first row, behind a uniform branch (`attend_window_causal`).
   Loop bounds are computed once per program from t0, t1 and the window's first page, so
   the unmasked loop has no per-pair mask and no branch. The block shape follows the
   window's length and the head size (LONG_WINDOW_BLOCKS, LONG_WINDOW_SMALL_HEAD_BLOCKS,
   SHORT_WINDOW_BLOCKS). Given the step's output,
   the kernel writes its rows there in the output's dtype.

Angles reach the tile's length (queries) and -(n_local + B) (keys): the rotation table must
have `angles_needed(config, T)` rows (QueryRotation.with_angles composes rows past L).
Positions are compared relative to the anchor in int32 (far keys clamped to -2^30, which
keeps them outside the window and past L), so any int64 position works; 2e8 is tested.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lminf_vllm.attention.triton_decode import (LOG2E, NEG_BIG, _pow2, check_inputs, cos_sin,
                                                 dot, load_stored_keys, per_key, rope_halves,
                                                 rotate)

# Block shapes by window length, measured on the H100 (bench/results/bench_kernels.json and
# prefill_block_shapes.json): query rows per program, keys per block of the unmasked loop,
# warps, its pipeline depth, and keys per block and pipeline depth of the masked exact loops
# (the window's far edge and the diagonal; a mask over a 128 x 128 block spills). 128-row
# programs pay for their edges (about 128 + 64 masked keys per row) only when the unmasked
# middle is long: from n_local 4096 on (385-392 vs 379 TF/s there, 310 vs 340 at 2048, 64 vs
# 109 at 256).
# The shapes also set the keys per block and pipeline depth where pairs can be capped (the
# window's oldest pages, one product per block; the global pages some row is within L of,
# two logit blocks at once), keys per block of the global pages every row is past L (one
# product per pair), and pages per program of turn_pages_kernel. The long-window shape's
# 64-key capped blocks: 398 TF/s on the H200 against 388 for 32 (2026-12-02 00:13 run,
# bench_kernels.json prefill_tuning; 2 bytes of spills against 4); deeper pipelines there
# lost (390) and are the ones ptxas can answer by serialising every wgmma (C7515).
# merge_capped (the far edge's blocks compute both cases, no capped loop) and their pipeline
# 3 deep: 416-419 TF/s against 405-409 for the separate capped loop (H200, 2026-12-02 runs
# 2-3, bench_prefill_variants.py and bench_kernels.json prefill_tuning); a causal loop
# spills at 128 x 128 (18-38 bytes: 346-371 TF/s). One page per turn_pages_kernel program:
# 18.5 us against 20.9 for 8 (graph replay, run 2).
# Four heads per program (pack_heads, 32 queries of 128 rows: far edge + diagonal 192 masked
# keys per row instead of 256) and the far global pages from the dense copy: 435-445 TF/s
# against 414-424 for one head per program, 0.853-0.867 of the dense Triton loop against
# 0.81-0.83 (H200, 2026-12-02 runs 8-11, bench_prefill_variants.py; 0 spills against 6);
# two heads 429, four with 32-key masked blocks 429-430, a causal loop 370, the diagonal
# blocks in a causal-mask loop of their own after the middle 430-431. The masked blocks'
# tests against per-row bounds in int32 (617 instructions per block against 1020 in the
# sm_90 compile): 439 against 438, with unmasked loads 434 (run 14: their cost is not the
# mask arithmetic); skipping tests per block behind uniform branches does not compile
# (Triton 3.6's pipeliner, run 13).
LONG_WINDOW = 4096
LONG_WINDOW_BLOCKS = dict(block_m=128, block_n=128, num_warps=8, num_stages=3,
                          edge_block_n=64, edge_stages=3, general_block_n=64, general_stages=1,
                          far_block_n=64, turn_pages=1, merge_capped=1, causal_loop=0,
                          pack_heads=4, far_dense=1)
# Small heads (head_dim <= 64) in a long window: half-height programs, two per SM (173
# registers, 104 KB of shared memory in the sm_90 compile), whose loads and masked blocks
# hide behind each other's products; on the H200 (2026-12-01 23:50 run, kernel c0d0855,
# bench_prefill_shapes.py --windows 1b: 32/8 heads, d64, n_local = L = 4096) 316 TF/s
# against 279 for the 128-row shape, which leaves one program per SM. There the merged far
# edge and the causal loop (no spills: 214 registers) take it to 331-335 TF/s against
# 302-304 without either and 315 with the merge alone (2026-12-02 runs 1-3,
# bench_prefill_variants.py); masking every block of that loop instead of a branch: 270.
# Four heads per program (16 queries) with 16-key masked blocks: 345-347 against 333-335
# (runs 8-11); 32-key masked blocks 341, the far global pages from the dense copy 344-345
# (no gain: kept off), 128-row programs 293, no causal loop 316-323.
LONG_WINDOW_SMALL_HEAD_BLOCKS = dict(block_m=64, block_n=128, num_warps=4, num_stages=3,
                                     edge_block_n=16, edge_stages=2, general_block_n=32,
                                     general_stages=1, far_block_n=64, turn_pages=1,
                                     merge_capped=1, causal_loop=1, pack_heads=4, far_dense=0)
SMALL_HEAD = 64
SHORT_WINDOW_BLOCKS = dict(block_m=64, block_n=64, num_warps=4, num_stages=3,
                           edge_block_n=32, edge_stages=2, general_block_n=32, general_stages=1,
                           far_block_n=64, turn_pages=8, merge_capped=0, causal_loop=0,
                           pack_heads=1, far_dense=0)
# float32 operands take twice the shared memory and IEEE products (triton_decode.dot) many
# more registers: the long-window shape would ask for 393 KB. This one fits (sm_90 compile).
FLOAT32_BLOCKS = dict(block_m=64, block_n=32, num_warps=4, num_stages=2,
                      edge_block_n=32, edge_stages=1, general_block_n=16, general_stages=1,
                      far_block_n=32, turn_pages=4, merge_capped=0, causal_loop=0,
                      pack_heads=1, far_dense=0)
# A key farther back than this from the anchor is clamped to it (still far: outside the
# window and past the distance limit).
FAR = tl.constexpr(1 << 30)
# The last compiled launch (bench/ reads its n_regs and n_spills).
LAST_LAUNCH = None


def angles_needed(config, tile_queries: int) -> int:
    """Rows of the rotation table the prefill of tiles of `tile_queries` queries reads.

    Queries turn by t - t mod B - a < T + B; exact-case keys by |b_p - a| <= max(L, T + B).
    """
    return max(config.trained_length, tile_queries + 2 * config.page_size) + 1


@triton.jit
def pages_past_limit(position, trained_length, PAGE_SIZE: tl.constexpr):
    """The number of leading pages (bases 0, B, 2B, ...) that `position` is past L for: whose
    base b_p has position - b_p > L, so that every pair of `position` with their keys is in
    the capped case. ceil((position - L) / B) when position > L, else 0."""
    return tl.where(position > trained_length,
                    (position - trained_length - 1) // PAGE_SIZE + 1, 0)


@triton.jit
def turn_pages_kernel(
    kv_ptr, table_ptr, pos_ptr, block_ptr, base_ptr, n_global_ptr,
    keys_ptr,                        # out: [N, Hkv, P * B, KEY_DIM], turned by b_p - a
    values_ptr,                      # out: [N, Hkv, P * B, HEAD_DIM_PAD]
    stride_kb, stride_kh, stride_ks, stride_table, stride_pos_n, stride_page_n,
    stride_kn, stride_kkh, stride_vn, stride_vh,
    num_queries, num_pages, copy_pages, max_angle, trained_length,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
    KEY_DIM: tl.constexpr, IS_NEOX: tl.constexpr, PAGES: tl.constexpr,
    FAR_DENSE: tl.constexpr,
):
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    page_lo = tl.program_id(2) * PAGES
    t_first = tl.load(pos_ptr + n * stride_pos_n)
    t_last = tl.load(pos_ptr + n * stride_pos_n + num_queries - 1)
    anchor = t_first - t_first % PAGE_SIZE

    page = page_lo + tl.arange(0, PAGES)
    base = tl.load(base_ptr + n * stride_page_n + page, mask=page < num_pages, other=-1)
    angle = tl.minimum(tl.maximum(base - anchor, -max_angle), max_angle).to(tl.int32)
    if FAR_DENSE:
        # global pages every query of the tile sees past L: copied as stored (angle 0), the
        # capped product's keys (lambda_prefill_kernel's far_global_keys, same bound)
        n_global = tl.load(n_global_ptr + n)
        global_pages = tl.cdiv(tl.minimum(n_global, t_last + 1), PAGE_SIZE)
        far_pages = pages_past_limit(t_first, trained_length, PAGE_SIZE)
        angle = tl.where(page < tl.minimum(far_pages, global_pages), 0, angle)
    cos, sin = cos_sin(table_ptr, stride_table, angle, HALF, HALF_PAD)
    cos = per_key(cos, PAGE_SIZE, PAGES * PAGE_SIZE, HALF_PAD)
    sin = per_key(sin, PAGE_SIZE, PAGES * PAGE_SIZE, HALF_PAD)

    key = tl.arange(0, PAGES * PAGE_SIZE)
    key_page = page_lo + key // PAGE_SIZE
    offset = key % PAGE_SIZE
    key_base = tl.load(base_ptr + n * stride_page_n + key_page, mask=key_page < num_pages,
                       other=-1)
    block = tl.load(block_ptr + n * stride_page_n + key_page, mask=key_page < num_pages,
                    other=0)
    written = (key_base >= 0) & (key_base + offset <= t_last)   # else: zeros in the copy
    stored = key_page < copy_pages                              # the list's pages + padding
    src = kv_ptr + block.to(tl.int64) * stride_kb + kv_head * stride_kh + offset * stride_ks
    k1, k2, kp = load_stored_keys(src, written, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    k1t, k2t = rotate(k1.to(tl.float32), k2.to(tl.float32), cos, sin)

    slot = page_lo * PAGE_SIZE + key
    dst = keys_ptr + n * stride_kn + kv_head * stride_kkh + slot.to(tl.int64) * KEY_DIM
    h = tl.arange(0, HALF_PAD)
    tl.store(dst[:, None] + h[None, :], k1t.to(k1.dtype), mask=stored[:, None])
    tl.store(dst[:, None] + HALF_PAD + h[None, :], k2t.to(k1.dtype), mask=stored[:, None])
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        tl.store(dst[:, None] + 2 * HALF_PAD + p_idx[None, :], kp, mask=stored[:, None])
    d = tl.arange(0, HEAD_DIM_PAD)
    v = tl.load(src[:, None] + HEAD_DIM + d[None, :],
                mask=written[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    v_dst = values_ptr + n * stride_vn + kv_head * stride_vh + slot.to(tl.int64) * HEAD_DIM_PAD
    tl.store(v_dst[:, None] + d[None, :], v, mask=stored[:, None])


@triton.jit
def load_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh,
               HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
               PASS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    """Rows' query features of one head: the two members of each rotation pair (float32)
    and the passthrough features (input dtype; zeros when PASS == 0, unused then)."""
    first, second, half_ok = rope_halves(HALF, HALF_PAD, IS_NEOX)
    q_base = q_ptr + (q_row.to(tl.int64) * stride_qt + head * stride_qh)[:, None]
    q_mask = row_ok[:, None] & half_ok[None, :]
    q1 = tl.load(q_base + first[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_base + second[None, :], mask=q_mask, other=0.0).to(tl.float32)
    p_idx = tl.arange(0, PASS_PAD)
    qp = tl.load(q_base + 2 * HALF + p_idx[None, :],
                 mask=row_ok[:, None] & (p_idx < PASS)[None, :], other=0.0)
    return q1, q2, qp


@triton.jit
def load_turned_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh, table_ptr, stride_table,
                      angle, scale_log2, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                      PASS: tl.constexpr, PASS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    """The rows' queries of one head turned by `angle` (per row), the softmax scale in log2
    units folded in (no multiply per logit): both rotation halves in the input dtype.

    Each turn reloads the query (L2 hits): a turn needed only by a later loop then holds no
    float32 registers through the loops before it."""
    q1, q2, qp = load_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh,
                            HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    cos, sin = cos_sin(table_ptr, stride_table, angle, HALF, HALF_PAD)
    t1, t2 = rotate(q1 * scale_log2, q2 * scale_log2, cos, sin)
    return t1.to(qp.dtype), t2.to(qp.dtype)


@triton.jit
def load_dense_keys(keys, slot_lo, key_mask, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                    PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED_LOAD: tl.constexpr):
    """A block of the dense turned copy: both rotation halves and the passthrough features
    (k1 as a placeholder when PASS == 0, unused then)."""
    h = tl.arange(0, HALF_PAD)
    slot = slot_lo + tl.arange(0, BLOCK_N)
    ptr = keys + slot.to(tl.int64)[:, None] * KEY_DIM
    if MASKED_LOAD:
        k1 = tl.load(ptr + h[None, :], mask=key_mask[:, None], other=0.0)
        k2 = tl.load(ptr + HALF_PAD + h[None, :], mask=key_mask[:, None], other=0.0)
    else:
        k1 = tl.load(ptr + h[None, :])
        k2 = tl.load(ptr + HALF_PAD + h[None, :])
    kp = k1
    if PASS > 0:
        p_idx = tl.arange(0, PASS_PAD)
        if MASKED_LOAD:
            kp = tl.load(ptr + 2 * HALF_PAD + p_idx[None, :], mask=key_mask[:, None],
                         other=0.0)
        else:
            kp = tl.load(ptr + 2 * HALF_PAD + p_idx[None, :])
    return k1, k2, kp


@triton.jit
def turned_logits(q1, q2, qp, k1, k2, kp, PASS: tl.constexpr):
    """<q, k> of turned query halves and keys, plus the passthrough features."""
    s = dot(q1, tl.trans(k1))
    s = dot(q2, tl.trans(k2), s)
    if PASS > 0:
        s = dot(qp, tl.trans(kp), s)
    return s


@triton.jit
def exact_logits(qe1, qe2, qp, keys, slot_lo, key_mask,
                 HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                 KEY_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED_LOAD: tl.constexpr):
    """<q turned by t - t mod B - a, key turned by b_p - a> for a block of dense slots."""
    k1, k2, kp = load_dense_keys(keys, slot_lo, key_mask, HALF_PAD, PASS, PASS_PAD, KEY_DIM,
                                 BLOCK_N, MASKED_LOAD)
    return turned_logits(qe1, qe2, qp, k1, k2, kp, PASS)


@triton.jit
def softmax_step(acc, m_i, l_i, s, values, slot_lo, key_mask,
                 HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED_LOAD: tl.constexpr):
    """Online softmax (s: logits in log2 units, masked) and the values' product."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    d = tl.arange(0, HEAD_DIM_PAD)
    slot = slot_lo + tl.arange(0, BLOCK_N)
    ptr = values + slot.to(tl.int64)[:, None] * HEAD_DIM_PAD + d[None, :]
    if MASKED_LOAD:
        v = tl.load(ptr, mask=key_mask[:, None], other=0.0)
    else:
        v = tl.load(ptr)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def stored_logits(qc1, qc2, qp, kv_ptr, block_ptr, n, kv_head, slot, key_ok,
                  stride_kb, stride_kh, stride_ks, stride_page_n,
                  PAGE_SIZE: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  PASS: tl.constexpr, PASS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    """<q turned by L - t mod B, key as stored> (the capped case) for a block of slots,
    read from their pages (slot // B is the page's index in the tile's list, slot mod B the
    key in it)."""
    block = tl.load(block_ptr + n * stride_page_n + slot // PAGE_SIZE, mask=key_ok, other=0)
    src = (kv_ptr + block.to(tl.int64) * stride_kb + kv_head * stride_kh
           + (slot % PAGE_SIZE) * stride_ks)
    k1, k2, kp = load_stored_keys(src, key_ok, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    s = dot(qc1, tl.trans(k1))
    s = dot(qc2, tl.trans(k2), s)
    if PASS > 0:
        s = dot(qp, tl.trans(kp), s)
    return s


@triton.jit
def attend_general(acc, m_i, l_i, slot_lo, j_lo, j_hi, n, kv_head, t_rel, anchor,
                   qe1, qe2, qc1, qc2, qp, keys, values, kv_ptr, block_ptr,
                   stride_kb, stride_kh, stride_ks, stride_page_n,
                   n_global, n_local, trained_length,
                   PAGE_SIZE: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   PASS: tl.constexpr, PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys j_lo .. j_lo + BLOCK_N (< j_hi) at dense slots slot_lo..: both cases per pair.

    Exact pairs use the dense turned copy; capped pairs the stored keys.
    """
    key = tl.arange(0, BLOCK_N)
    j = j_lo + key
    key_ok = j < j_hi
    s = exact_logits(qe1, qe2, qp, keys, slot_lo, key_ok,
                     HALF_PAD, PASS, PASS_PAD, KEY_DIM, BLOCK_N, True)
    s_capped = stored_logits(qc1, qc2, qp, kv_ptr, block_ptr, n, kv_head, slot_lo + key, key_ok,
                             stride_kb, stride_kh, stride_ks, stride_page_n,
                             PAGE_SIZE, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    j_rel = tl.maximum(j - anchor, -FAR).to(tl.int32)
    page_rel = tl.maximum(j - j % PAGE_SIZE - anchor, -FAR).to(tl.int32)
    exact = (t_rel[:, None] - page_rel[None, :]) <= trained_length
    dist = t_rel[:, None] - j_rel[None, :]
    visible = (key_ok[None, :] & (dist >= 0)
               & ((j < n_global)[None, :] | (dist < n_local)))
    s = tl.where(visible, tl.where(exact, s, s_capped), float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, slot_lo, key_ok, HEAD_DIM_PAD, BLOCK_N, True)


@triton.jit
def attend_far_global(acc, m_i, l_i, j_lo, j_hi, n, kv_head, qc1, qc2, qp, values, kv_ptr,
                      block_ptr, stride_kb, stride_kh, stride_ks, stride_page_n, n_global,
                      PAGE_SIZE: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                      PASS: tl.constexpr, PASS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                      IS_NEOX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Global keys j_lo .. j_lo + BLOCK_N (< j_hi) that every row sees past L: one product.

    Every row is further than L from each of these pages (the caller's bound), so every
    pair is capped and visible (global, behind every row): only j < n_global masks.
    """
    j = j_lo + tl.arange(0, BLOCK_N)
    key_ok = (j < j_hi) & (j < n_global)
    s = stored_logits(qc1, qc2, qp, kv_ptr, block_ptr, n, kv_head, j, key_ok,
                      stride_kb, stride_kh, stride_ks, stride_page_n,
                      PAGE_SIZE, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    s = tl.where(key_ok[None, :], s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, j_lo, key_ok, HEAD_DIM_PAD, BLOCK_N, True)


@triton.jit
def attend_far_global_dense(acc, m_i, l_i, j_lo, j_hi, qc1, qc2, qp, keys, values, n_global,
                            HALF_PAD: tl.constexpr, PASS: tl.constexpr, PASS_PAD: tl.constexpr,
                            KEY_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """attend_far_global with the keys from the dense copy, where turn_pages_kernel (far_dense)
    left these pages as stored: no page lookups, contiguous loads."""
    j = j_lo + tl.arange(0, BLOCK_N)
    key_ok = (j < j_hi) & (j < n_global)
    s = exact_logits(qc1, qc2, qp, keys, j_lo, key_ok, HALF_PAD, PASS, PASS_PAD, KEY_DIM,
                     BLOCK_N, True)
    s = tl.where(key_ok[None, :], s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, j_lo, key_ok, HEAD_DIM_PAD, BLOCK_N, True)


@triton.jit
def window_masks(j, t_rel, anchor, n_local, trained_length, PAGE_SIZE: tl.constexpr):
    """Per (row, window key j): visible (inside the row's window, not ahead of it) and exact
    (the key's page within L of the row)."""
    j_rel = (j - anchor).to(tl.int32)
    page_rel = (j - j % PAGE_SIZE - anchor).to(tl.int32)
    dist = t_rel[:, None] - j_rel[None, :]
    visible = (dist >= 0) & (dist < n_local)
    exact = (t_rel[:, None] - page_rel[None, :]) <= trained_length
    return visible, exact


@triton.jit
def attend_window(acc, m_i, l_i, slot_lo, j_lo, j_hi, t_rel, anchor, qe1, qe2, qp,
                  keys, values, n_local, trained_length,
                  PAGE_SIZE: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                  PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Window keys j_lo .. j_lo + BLOCK_N, their exact pairs, from the dense copy.

    MASKED: the block touches the window's far edge or the diagonal (or ends past j_hi);
    otherwise every row sees every key of the block exactly and no mask is evaluated. The
    mask keeps the visible exact pairs (the capped ones are attend_window_capped's): keys
    from j_hi = t1 + 1 on are at negative distance from every row, and padding rows (past
    the tile's queries) repeat t1 and are not stored.
    """
    j = j_lo + tl.arange(0, BLOCK_N)
    key_ok = j < j_hi
    s = exact_logits(qe1, qe2, qp, keys, slot_lo, key_ok,
                     HALF_PAD, PASS, PASS_PAD, KEY_DIM, BLOCK_N, MASKED)
    if MASKED:
        visible, exact = window_masks(j, t_rel, anchor, n_local, trained_length, PAGE_SIZE)
        s = tl.where(visible & exact, s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, slot_lo, key_ok, HEAD_DIM_PAD, BLOCK_N,
                        MASKED)


@triton.jit
def attend_window_capped(acc, m_i, l_i, slot_lo, j_lo, j_hi, t_rel, anchor, qw1, qw2, qp,
                         keys, values, n_local, trained_length,
                         PAGE_SIZE: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                         PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Window keys j_lo .. j_lo + BLOCK_N (< j_hi) whose pages some row sees past L: their
    capped pairs, from the dense copy.

    With n_local <= L (LMInfConfig's bound) the capped pairs a row t sees all lie in one
    page, b_c(t) = B * floor((t - L - 1) / B); qw (the query turned by b_c(t) - a + L -
    t mod B) against the copy's keys (turned by b_c(t) - a) gives their capped logit.
    """
    j = j_lo + tl.arange(0, BLOCK_N)
    key_ok = j < j_hi
    s = exact_logits(qw1, qw2, qp, keys, slot_lo, key_ok,
                     HALF_PAD, PASS, PASS_PAD, KEY_DIM, BLOCK_N, True)
    visible, exact = window_masks(j, t_rel, anchor, n_local, trained_length, PAGE_SIZE)
    s = tl.where(key_ok[None, :] & visible & (exact == 0), s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, slot_lo, key_ok, HEAD_DIM_PAD, BLOCK_N, True)


@triton.jit
def attend_window_both(acc, m_i, l_i, slot_lo, j_lo, j_hi, t_rel, anchor, qe1, qe2, qw1, qw2,
                       qp, keys, values, n_local, trained_length,
                       PAGE_SIZE: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                       PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr,
                       HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Window keys j_lo .. j_lo + BLOCK_N (< j_hi) at the window's far edge: exact and
    capped pairs alike from one load of the dense copy (the exact query and the window's
    capped query, attend_window_capped's, against the same keys), one softmax step."""
    j = j_lo + tl.arange(0, BLOCK_N)
    key_ok = j < j_hi
    k1, k2, kp = load_dense_keys(keys, slot_lo, key_ok, HALF_PAD, PASS, PASS_PAD, KEY_DIM,
                                 BLOCK_N, True)
    s = turned_logits(qe1, qe2, qp, k1, k2, kp, PASS)
    s_capped = turned_logits(qw1, qw2, qp, k1, k2, kp, PASS)
    visible, exact = window_masks(j, t_rel, anchor, n_local, trained_length, PAGE_SIZE)
    s = tl.where(visible, tl.where(exact, s, s_capped), float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, slot_lo, key_ok, HEAD_DIM_PAD, BLOCK_N, True)


@triton.jit
def attend_window_causal(acc, m_i, l_i, slot_lo, j_lo, t0_rel, t_rel, anchor, qe1, qe2, qp,
                         keys, values, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                         PASS_PAD: tl.constexpr, KEY_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Window keys j_lo .. j_lo + BLOCK_N past the far edge, which every row sees exactly
    unless they are ahead of it: the causal mask j <= t alone, and only on blocks that reach
    past the first row t0 (a uniform branch; the diagonal), so that the far edge's
    end, the middle and the diagonal are one pipelined loop. Slots past the copy's pages
    are its zero padding (turn_pages)."""
    s = exact_logits(qe1, qe2, qp, keys, slot_lo, slot_lo, HALF_PAD, PASS, PASS_PAD, KEY_DIM,
                     BLOCK_N, False)
    if (j_lo - anchor).to(tl.int32) + BLOCK_N - 1 > t0_rel:
        j_rel = (j_lo - anchor).to(tl.int32) + tl.arange(0, BLOCK_N)
        s = tl.where(j_rel[None, :] <= t_rel[:, None], s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, values, slot_lo, slot_lo, HEAD_DIM_PAD, BLOCK_N,
                        False)


@triton.jit
def lambda_prefill_kernel(
    # query [T_all, H, D]; kv_cache [blocks, Hkv, B, 2D]; table [rows, rotary_dim] f32
    q_ptr, kv_ptr, table_ptr,
    # TileGroup tensors: query_rows, query_position [N, T]; page_block, page_base [N, P];
    # n_global, n_local [N] (each tile's request's own values)
    rows_ptr, pos_ptr, block_ptr, base_ptr, n_global_ptr, n_local_ptr,
    keys_ptr, values_ptr,            # turn_pages_kernel's dense copies
    out_ptr,                         # [N, T, H, D] float32, or the step's [T_all, H, D]
    stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_table,
    stride_row_n, stride_pos_n, stride_page_n,
    stride_kn, stride_kkh, stride_vn, stride_vh,
    stride_on, stride_ot, stride_oh,
    num_queries, num_pages,
    scale_log2,                      # softmax scale * log2(e)
    trained_length,
    PAGE_SIZE: tl.constexpr,         # B
    GROUP: tl.constexpr,             # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr,              # rotary_dim / 2
    HALF_PAD: tl.constexpr,
    PASS: tl.constexpr,              # head_dim - rotary_dim
    PASS_PAD: tl.constexpr,
    KEY_DIM: tl.constexpr,           # 2 * HALF_PAD (+ PASS_PAD): a dense key's features
    IS_NEOX: tl.constexpr,
    BLOCK_M: tl.constexpr,           # query rows per program
    BLOCK_N: tl.constexpr,           # keys per block of the exact loops
    EDGE_BLOCK_N: tl.constexpr,      # keys per block of the masked exact loops
    EDGE_STAGES: tl.constexpr,       # their pipeline depth (a few blocks per row block)
    GENERAL_BLOCK_N: tl.constexpr,   # keys per block where both cases are computed
    GENERAL_STAGES: tl.constexpr,    # their pipeline depth
    FAR_BLOCK_N: tl.constexpr,       # keys per block of the global pages every row is past
    MERGE_CAPPED: tl.constexpr,      # masked window blocks compute both cases (no capped loop)
    CAUSAL_LOOP: tl.constexpr,       # past the far edge one causal loop (else: unmasked middle
                                     # + masked diagonal)
    TO_STEP_ROWS: tl.constexpr,      # out is the step's output: rows query_rows, its dtype
    FAR_DENSE: tl.constexpr,         # the far global pages' keys from the dense copy (as
                                     # stored there: turn_pages far_dense)
    PACK: tl.constexpr,              # query heads per program (of one KV head): rows are
                                     # (query, head) pairs, BLOCK_M // PACK queries
):
    row_block = tl.program_id(0)
    head_lo = tl.program_id(1) * PACK
    n = tl.program_id(2)
    kv_head = head_lo // GROUP
    keys = keys_ptr + n * stride_kn + kv_head * stride_kkh
    values = values_ptr + n * stride_vn + kv_head * stride_vh
    n_global = tl.load(n_global_ptr + n)
    n_local = tl.load(n_local_ptr + n)

    # ---- the rows' queries and their turns (exact, capped, and the window's capped
    # pairs: see attend_window_capped), made before the accumulator holds registers ----
    # row r is query m = first + r // PACK of head head_lo + r % PACK: the PACK heads of a
    # query share its position (one span of positions per program: narrower window edges)
    QUERIES: tl.constexpr = BLOCK_M // PACK
    r = tl.arange(0, BLOCK_M)
    m = row_block * QUERIES + r // PACK
    head = head_lo + r % PACK
    row_ok = m < num_queries
    pos = pos_ptr + n * stride_pos_n
    tile_first = tl.load(pos)
    tile_last = tl.load(pos + num_queries - 1)
    anchor = tile_first - tile_first % PAGE_SIZE
    t0 = tl.load(pos + row_block * QUERIES)
    t1 = tl.load(pos + tl.minimum(row_block * QUERIES + QUERIES, num_queries) - 1)
    t = tl.load(pos + m, mask=row_ok, other=t1)
    q_row = tl.load(rows_ptr + n * stride_row_n + m, mask=row_ok, other=0)
    t_in_page = (t % PAGE_SIZE).to(tl.int32)
    t_rel = (t - anchor).to(tl.int32)                     # in [0, T + B)
    _, _, qp = load_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh,
                          HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    qp = (qp.to(tl.float32) * scale_log2).to(qp.dtype)
    # the page of a row's capped window pairs, relative to the anchor: floor_B(t_rel - L - 1),
    # taken on a non-negative numerator
    lift = tl.cdiv(trained_length + 1, PAGE_SIZE) * PAGE_SIZE
    capped_page_rel = (t_rel - trained_length - 1 + lift) // PAGE_SIZE * PAGE_SIZE - lift
    qe1, qe2 = load_turned_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh, table_ptr,
                                 stride_table, t_rel - t_in_page, scale_log2,
                                 HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    qc1, qc2 = load_turned_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh, table_ptr,
                                 stride_table, trained_length - t_in_page, scale_log2,
                                 HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)
    qw1, qw2 = load_turned_query(q_ptr, q_row, head, row_ok, stride_qt, stride_qh, table_ptr,
                                 stride_table, capped_page_rel + trained_length - t_in_page,
                                 scale_log2, HALF, HALF_PAD, PASS, PASS_PAD, IS_NEOX)

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # ---- the window pages: contiguous positions from the list's first window page, at
    # slot global_keys (+ j - window_base); keys from the first one some row sees to t1 ----
    global_keys = tl.cdiv(tl.minimum(n_global, tile_last + 1), PAGE_SIZE) * PAGE_SIZE
    global_pages = global_keys // PAGE_SIZE
    first_window = tl.load(base_ptr + n * stride_page_n + global_pages,
                           mask=global_pages < num_pages, other=-1)
    window_base = tl.where(first_window >= 0, first_window, global_keys)
    slot_of = global_keys - window_base
    j_start = tl.maximum(window_base, t0 - n_local + 1)
    j_end = t1 + 1
    # pages with base < t1 - L can be past the distance limit for some row: [j_start, j_exact)
    capped_end = tl.cdiv(tl.maximum(t1 - trained_length, 0), PAGE_SIZE) * PAGE_SIZE
    j_exact = tl.maximum(j_start, tl.minimum(capped_end, j_end))

    # ---- the window's capped pairs first (then qw holds no registers through the loops
    # below; the exact query is the only one the window's exact pairs need) ----
    capped_hi = j_exact if MERGE_CAPPED == 0 else j_start
    for j_lo in tl.range(j_start, capped_hi, GENERAL_BLOCK_N, num_stages=GENERAL_STAGES):
        acc, m_i, l_i = attend_window_capped(
            acc, m_i, l_i, slot_of + j_lo, j_lo, j_exact, t_rel, anchor, qw1, qw2, qp,
            keys, values, n_local, trained_length,
            PAGE_SIZE, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, GENERAL_BLOCK_N)

    # ---- the global pages: the first num_global pages of the list, slots = positions ----
    # Pages whose base is before t0 - L are past the distance limit for every row: capped
    # alone (the usual case once a stream is longer than L); the rest both cases.
    if FAR_DENSE:   # the tile's first query's bound: what turn_pages_kernel copied as stored
        far_pages = pages_past_limit(tile_first, trained_length, PAGE_SIZE)
    else:
        far_pages = pages_past_limit(t0, trained_length, PAGE_SIZE)
    far_global_keys = tl.minimum(far_pages * PAGE_SIZE, global_keys)
    for j_lo in tl.range(0, far_global_keys, FAR_BLOCK_N, num_stages=1):
        if FAR_DENSE:
            acc, m_i, l_i = attend_far_global_dense(
                acc, m_i, l_i, j_lo, far_global_keys, qc1, qc2, qp, keys, values, n_global,
                HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, FAR_BLOCK_N)
        else:
            acc, m_i, l_i = attend_far_global(
                acc, m_i, l_i, j_lo, far_global_keys, n, kv_head, qc1, qc2, qp, values, kv_ptr,
                block_ptr, stride_kb, stride_kh, stride_ks, stride_page_n, n_global,
                PAGE_SIZE, HALF, HALF_PAD, PASS, PASS_PAD, HEAD_DIM_PAD, IS_NEOX, FAR_BLOCK_N)
    for j_lo in tl.range(far_global_keys, global_keys, GENERAL_BLOCK_N,
                         num_stages=GENERAL_STAGES):
        acc, m_i, l_i = attend_general(
            acc, m_i, l_i, j_lo, j_lo, global_keys, n, kv_head, t_rel, anchor,
            qe1, qe2, qc1, qc2, qp, keys, values, kv_ptr, block_ptr,
            stride_kb, stride_kh, stride_ks, stride_page_n, n_global, n_local, trained_length,
            PAGE_SIZE, HALF, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, IS_NEOX,
            GENERAL_BLOCK_N)

    # ---- the window's exact pairs, with the exact query alone ----
    # Three runs: masked at the window's far edge [j_start, far_end) (keys some row is
    # already past, or sees past L), unmasked in the middle [far_end, middle_end) (whole
    # BLOCK_N blocks every row sees exactly: first key inside the last row's window and
    # exact for it, last key <= t0), masked on the diagonal [middle_end, t1]. Both masked
    # runs are one loop (one pipeline) of EDGE_BLOCK_N-key blocks: a mask over a BLOCK_M x
    # BLOCK_N block costs registers the unmasked loop needs for its pipeline.
    far_keys = tl.maximum(tl.maximum(t1 - n_local + 1, j_exact) - j_start, 0)
    far_blocks = tl.cdiv(far_keys, EDGE_BLOCK_N)
    far_end = tl.minimum(j_start + far_blocks * EDGE_BLOCK_N, j_end)
    middle_end = far_end + tl.maximum(t0 + 1 - far_end, 0) // BLOCK_N * BLOCK_N
    if CAUSAL_LOOP:
        masked_blocks = far_blocks
    else:
        masked_blocks = far_blocks + tl.cdiv(j_end - middle_end, EDGE_BLOCK_N)
    for i in tl.range(0, masked_blocks, num_stages=EDGE_STAGES):
        j_lo = tl.where(i < far_blocks, j_start + i * EDGE_BLOCK_N,
                        middle_end + (i - far_blocks) * EDGE_BLOCK_N)
        if MERGE_CAPPED:
            acc, m_i, l_i = attend_window_both(
                acc, m_i, l_i, slot_of + j_lo, j_lo, j_end, t_rel, anchor, qe1, qe2, qw1, qw2,
                qp, keys, values, n_local, trained_length,
                PAGE_SIZE, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, EDGE_BLOCK_N)
        else:
            acc, m_i, l_i = attend_window(
                acc, m_i, l_i, slot_of + j_lo, j_lo, j_end, t_rel, anchor, qe1, qe2, qp,
                keys, values, n_local, trained_length,
                PAGE_SIZE, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, EDGE_BLOCK_N, True)
    if CAUSAL_LOOP:
        t0_rel = (t0 - anchor).to(tl.int32)
        for j_lo in tl.range(far_end, j_end, BLOCK_N):
            acc, m_i, l_i = attend_window_causal(
                acc, m_i, l_i, slot_of + j_lo, j_lo, t0_rel, t_rel, anchor, qe1, qe2, qp,
                keys, values, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, BLOCK_N)
    else:
        for j_lo in tl.range(far_end, middle_end, BLOCK_N):
            acc, m_i, l_i = attend_window(
                acc, m_i, l_i, slot_of + j_lo, j_lo, j_end, t_rel, anchor, qe1, qe2, qp,
                keys, values, n_local, trained_length,
                PAGE_SIZE, HALF_PAD, PASS, PASS_PAD, KEY_DIM, HEAD_DIM_PAD, BLOCK_N, False)

    d = tl.arange(0, HEAD_DIM_PAD)
    if TO_STEP_ROWS:
        out_row = q_row.to(tl.int64) * stride_ot
    else:
        out_row = n * stride_on + m.to(tl.int64) * stride_ot
    out = out_ptr + (out_row + head * stride_oh)[:, None] + d[None, :]
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out, result.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


def _shapes(head_dim: int, rotation) -> dict:
    """Feature-axis constexprs: the rotation pairs' halves, the passthrough, the key width."""
    half = rotation.rotary_dim // 2
    passthrough = head_dim - rotation.rotary_dim
    shapes = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16), HALF=half,
                  HALF_PAD=_pow2(half, 16), PASS=passthrough, PASS_PAD=_pow2(passthrough, 16),
                  IS_NEOX=bool(rotation.is_neox_style))
    shapes["KEY_DIM"] = 2 * shapes["HALF_PAD"] + (shapes["PASS_PAD"] if passthrough else 0)
    return shapes


def _pack(group_size: int, requested: int) -> int:
    """Query heads per program: the largest power of two dividing both the GQA group and
    the shape's pack_heads (the packed heads must share one KV head)."""
    pack = 1
    while group_size % (2 * pack) == 0 and requested % (2 * pack) == 0:
        pack *= 2
    return pack


def turn_pages(group, kv_cache: torch.Tensor, rotation, pages_per_program: int = 8,
               pad_pages: int = 0, trained_length: int = 0, far_dense: int = 0):
    """Dense copies of each tile's pages: keys turned by b_p - a, and values.

    Returns keys [N, Hkv, (P + pad_pages) * B, KEY_DIM] and values [N, Hkv, (P + pad_pages)
    * B, HEAD_DIM_PAD] in the cache's dtype; slots not written yet, padding pages of the
    list and the pad_pages after it (read by unmasked blocks that reach past the list's
    end) are zeros. far_dense: the global pages every query of a tile is more than
    trained_length past are copied as stored (their capped product's keys) instead.
    """
    num_tiles, num_queries = group.query_rows.shape
    num_pages = group.page_block.shape[1]
    num_kv_heads, page_size = kv_cache.shape[1], kv_cache.shape[2]
    shapes = _shapes(kv_cache.shape[3] // 2, rotation)
    copy_pages = num_pages + pad_pages
    slots = copy_pages * page_size
    keys = torch.empty(num_tiles, num_kv_heads, slots, shapes["KEY_DIM"],
                       device=kv_cache.device, dtype=kv_cache.dtype)
    values = torch.empty(num_tiles, num_kv_heads, slots, shapes["HEAD_DIM_PAD"],
                         device=kv_cache.device, dtype=kv_cache.dtype)
    table = rotation.cos_sin
    turn_pages_kernel[(num_tiles, num_kv_heads, triton.cdiv(copy_pages, pages_per_program))](
        kv_cache, table, group.query_position, group.page_block, group.page_base,
        group.n_global, keys, values,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), table.stride(0),
        group.query_position.stride(0), group.page_block.stride(0),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        num_queries, num_pages, copy_pages, table.shape[0] - 1, trained_length,
        PAGE_SIZE=page_size, PAGES=pages_per_program, FAR_DENSE=far_dense, **shapes)
    return keys, values


def block_shape(config, dtype: torch.dtype, head_dim: int) -> dict:
    """The default block shape for this window, dtype and head size."""
    if dtype == torch.float32:
        return FLOAT32_BLOCKS
    if config.n_local < LONG_WINDOW:
        return SHORT_WINDOW_BLOCKS
    return LONG_WINDOW_SMALL_HEAD_BLOCKS if head_dim <= SMALL_HEAD else LONG_WINDOW_BLOCKS


def attend_group(plan, group, query: torch.Tensor, kv_cache: torch.Tensor, rotation,
                 scale: float, output: torch.Tensor | None = None, **blocks) -> torch.Tensor:
    """Prefill Λ-attention of one group; same contract as reference.attend_group.

    query: [T_all, H, D]; kv_cache: [blocks, Hkv, B, 2D]; returns [N, T, H, D] float32, or,
    given the step's output [T_all, H, D], writes the group's rows there in its dtype (what
    the backend does: no float32 copy to convert and scatter afterwards) and returns it.
    rotation must have angles_needed(plan.config, T) rows (QueryRotation.with_angles).
    blocks: any of LONG_WINDOW_BLOCKS' keys, over the shape chosen by the window's length,
    the dtype and the head size (block_shape).
    """
    check_inputs(plan.config, group, query, kv_cache, rotation, decode=False)
    config = plan.config
    shape = block_shape(config, query.dtype, query.shape[2])
    unknown = set(blocks) - set(shape)
    if unknown:
        raise TypeError(f"lminf triton_prefill: unknown block arguments {sorted(unknown)}")
    shape = dict(shape, **blocks)
    page_size = kv_cache.shape[2]
    num_tiles, num_queries = group.query_rows.shape
    needed = angles_needed(config, num_queries)
    if rotation.cos_sin.shape[0] < needed:
        raise ValueError(f"lminf triton_prefill: tiles of {num_queries} queries need a "
                         f"rotation table of {needed} rows, got {rotation.cos_sin.shape[0]}; "
                         f"build it with QueryRotation.with_angles({needed})")
    num_pages = group.page_block.shape[1]
    num_heads, head_dim = query.shape[1], query.shape[2]
    if output is None:
        out = torch.empty(num_tiles, num_queries, num_heads, head_dim, device=query.device,
                          dtype=torch.float32)
    else:
        if output.shape != query.shape or output.device != query.device \
                or not output.is_floating_point() or output.stride(2) != 1:
            raise ValueError(f"lminf triton_prefill: output must be a floating [T, H, D] "
                             f"tensor like query {tuple(query.shape)} on {query.device} with "
                             f"contiguous features, got {tuple(output.shape)} {output.dtype} "
                             f"on {output.device}")
        out = output
    if num_tiles == 0 or num_queries == 0:
        return out
    group_size = num_heads // kv_cache.shape[1]
    pack = min(_pack(group_size, shape["pack_heads"]), shape["block_m"])
    block_m = min(shape["block_m"], _pow2(num_queries * pack, 16))
    shapes = _shapes(head_dim, rotation)
    # the causal window loop's last block can reach BLOCK_N - 1 slots past the list's end
    pad_pages = triton.cdiv(shape["block_n"], page_size) if shape["causal_loop"] else 0
    keys, values = turn_pages(group, kv_cache, rotation, shape["turn_pages"], pad_pages,
                              config.trained_length, shape["far_dense"])
    table = rotation.cos_sin
    global LAST_LAUNCH
    LAST_LAUNCH = lambda_prefill_kernel[(triton.cdiv(num_queries, block_m // pack),
                                         num_heads // pack,
                                         num_tiles)](
        query, kv_cache, table,
        group.query_rows, group.query_position, group.page_block, group.page_base,
        group.n_global, group.n_local,
        keys, values, out,
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        table.stride(0),
        group.query_rows.stride(0), group.query_position.stride(0),
        group.page_block.stride(0),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        0 if output is not None else out.stride(0), out.stride(-3), out.stride(-2),
        num_queries, num_pages,
        scale * LOG2E,
        config.trained_length,
        PAGE_SIZE=page_size, GROUP=group_size,
        BLOCK_M=block_m, BLOCK_N=shape["block_n"], EDGE_BLOCK_N=shape["edge_block_n"],
        EDGE_STAGES=shape["edge_stages"], GENERAL_BLOCK_N=shape["general_block_n"],
        GENERAL_STAGES=shape["general_stages"],
        FAR_BLOCK_N=shape["far_block_n"], MERGE_CAPPED=shape["merge_capped"],
        CAUSAL_LOOP=shape["causal_loop"], TO_STEP_ROWS=output is not None, PACK=pack,
        FAR_DENSE=shape["far_dense"],
        num_warps=shape["num_warps"], num_stages=shape["num_stages"],
        **shapes,
    )
    return out
