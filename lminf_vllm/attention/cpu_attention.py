"""Λ-attention on the CPU through torch's fused flash attention: the CPU serving path.

The reference (reference.py) states the semantics of DESIGN §2 in the plainest tensor form
and materialises [T, P, B] logits; this module computes the same numbers with the shape the
GPU prefill kernel has, so that real windows (thousands of keys) run at the speed of
torch's multi-threaded CPU flash attention (`aten::_scaled_dot_product_flash_attention_for_cpu`,
which also returns the log-sum-exp):

* Per tile, its pages (plan.TileGroup) are gathered once per layer into a workspace and the
  keys are turned from the page-local frame into the tile's frame: page p by b_p - r, with r
  the page base of the tile's first query. Queries turned to t - r then see every *near*
  key (t - b_p <= L) at its exact distance t - j: one flash attention over the whole tile.
* Keys of *far* pages (t - b_p > L: the global prefix seen from past L) sit at distance
  L - (j mod B), which is the stored key against the query turned to L: a second flash
  attention over the leading page columns that hold any far key (the global pages, G of
  them), merged with the first by log-sum-exp.

Everything that does not depend on the layer (masks, angles, the flat block list) is made
once per step by `prepare` and reused by every layer; the workspaces are allocated once per
step too, because fresh large tensors per layer cost more in page faults than the copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lminf_vllm import rope_frame
from lminf_vllm.attention.plan import AttentionPlan, TileGroup
from lminf_vllm.attention.rotation import QueryRotation, rotate_into

_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Queries per prefill tile: a tile's keys span n_local + tile tokens, so the share of the
# flash attention spent on masked keys is about tile / (n_local + tile); longer tiles waste
# less but hold [tile, n_local + tile] masks. A quarter of the window, in [64, 512].
MIN_TILE_QUERIES, MAX_TILE_QUERIES = 64, 512
# Key/value elements one batch of tiles may gather per layer (float32: 64 MiB per buffer);
# a step with more tiles runs them in several batches.
WORKSPACE_ELEMENTS = 1 << 24


def tile_queries(config) -> int:
    """Queries per prefill tile for this path (a multiple of the page size)."""
    quarter = config.n_local // 4 // config.page_size * config.page_size
    return max(MIN_TILE_QUERIES, min(MAX_TILE_QUERIES, max(quarter, config.page_size)))


def angles_needed(config, queries_per_tile: int) -> int:
    """Rows of the rotation table this path reads: angles 0 .. L + B + tile (see prepare)."""
    return config.trained_length + config.page_size + queries_per_tile + 1


@dataclass(frozen=True)
class TileBatch:
    """n tiles of T queries and P pages each, with the per-step tensors of their attention.

    rows:            [n * T] query rows of the step
    blocks:          [n * P] physical pages, tile-major
    key_cos/sin:     [n, P, 1, rot / 2] turn of each page's keys into the tile frame (b_p - r)
    near_cos/sin:    [n, T, 1, rot / 2] turn of each query into the tile frame (own base - r),
                     None when every query is on the tile's first page (a decode tile)
    far_cos/sin:     [n, T, 1, rot / 2] turn of each query to L - (t mod B)
    unseen_slots:    [U] flat indices into the n * P * B gathered slots that no query of
                     its tile sees (zeroed when gathered: such a slot may hold anything,
                     and a zero weight on a NaN still poisons the sum)
    near_mask:       [n, 1, T, P * B] additive (0 / -inf), visible and near
    far_mask:        [n, 1, T, F * B] additive over the first F page columns, visible and far
    far_row_bias:    [n, 1, T] 0 where a query sees a far key, -inf where it sees none
    """

    rows: torch.Tensor
    blocks: torch.Tensor
    key_cos: torch.Tensor
    key_sin: torch.Tensor
    near_cos: torch.Tensor | None
    near_sin: torch.Tensor | None
    far_cos: torch.Tensor
    far_sin: torch.Tensor
    unseen_slots: torch.Tensor
    near_mask: torch.Tensor
    far_mask: torch.Tensor | None
    far_row_bias: torch.Tensor | None


@dataclass(frozen=True)
class CpuStep:
    """One step's tile batches and the rotation they turn by; shared by every layer.

    workspace: scratch buffers by name, allocated by the step's first layer and reused by
    the others (a layer's attention never overlaps another's).
    """

    batches: tuple[TileBatch, ...]
    rotation: QueryRotation
    workspace: dict = field(default_factory=dict)

    def buffer(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        flat = self.workspace.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype:
            flat = self.workspace[name] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


def _prepare_batch(config, group: TileGroup, sel: slice, rotation: QueryRotation,
                   limit: int) -> TileBatch:
    page_size, trained_length = config.page_size, config.trained_length
    position = group.query_position[sel]                           # [n, T]
    page_base = group.page_base[sel]                                # [n, P]
    n, num_pages = page_base.shape
    tile_base = rope_frame.page_base(rope_frame.logical_page(position[:, :1], page_size),
                                     page_size)                     # r, [n, 1]
    # Near pages lie within L + B of r and at most a tile past it; pages outside that range
    # are far or padding for every query of the tile, so any finite turn serves them.
    key_angle = (page_base - tile_base).clamp(-(trained_length + page_size), limit)
    own_base = rope_frame.page_base(rope_frame.logical_page(position, page_size), page_size)
    far_angle = trained_length - rope_frame.key_frame_position(position, page_size)
    key_cos, key_sin = rotation.cos_sin_of(key_angle[:, :, None])
    near_angle = own_base - tile_base
    near_cos = near_sin = None
    if bool(near_angle.any()):
        near_cos, near_sin = rotation.cos_sin_of(near_angle[:, :, None])
    far_cos, far_sin = rotation.cos_sin_of(far_angle[:, :, None])

    key_position = (page_base[:, :, None] + torch.arange(page_size)).view(n, 1, -1)
    t = position[:, :, None]                                        # [n, T, 1]
    visible = rope_frame.visible(t, key_position, group.n_global[sel, None, None],
                                 group.n_local[sel, None, None])
    visible &= (page_base >= 0).repeat_interleave(page_size, dim=1)[:, None, :]
    near = (t - page_base[:, None, :] <= trained_length).repeat_interleave(page_size, dim=2)
    far_visible = visible & ~near
    far_columns = far_visible.any(dim=(0, 1)).view(num_pages, page_size).any(dim=1)
    num_far_pages = int(far_columns.nonzero().max()) + 1 if bool(far_columns.any()) else 0
    far_keys = num_far_pages * page_size
    far_mask = far_row_bias = None
    if num_far_pages:
        far_visible = far_visible[:, :, :far_keys]
        far_mask = _additive(far_visible)[:, None]
        far_row_bias = _additive(far_visible.any(dim=2))[:, None]
    return TileBatch(
        rows=group.query_rows[sel].reshape(-1),
        blocks=group.page_block[sel].reshape(-1),
        key_cos=key_cos, key_sin=key_sin, near_cos=near_cos, near_sin=near_sin,
        far_cos=far_cos, far_sin=far_sin,
        unseen_slots=(~visible.any(dim=1)).view(-1).nonzero().view(-1),
        near_mask=_additive(visible & near)[:, None],
        far_mask=far_mask, far_row_bias=far_row_bias)


def prepare(plan: AttentionPlan, rotation: QueryRotation, num_kv_heads: int,
            head_dim: int, workspace_elements: int = WORKSPACE_ELEMENTS) -> CpuStep:
    """The step's tile batches: everything of the attention that no layer changes.

    num_kv_heads, head_dim: the layers' KV shape; a batch of tiles gathers at most
    workspace_elements of keys and values per layer (at least one tile).
    """
    config = plan.config
    page_size, width = config.page_size, 2 * head_dim
    rotation = rotation.with_angles(
        angles_needed(config, max((g.query_rows.shape[1] for g in plan.groups), default=1)))
    batches = []
    for group in plan.groups:
        num_tiles, queries = group.query_rows.shape
        pages = group.page_block.shape[1]
        limit = queries + page_size
        per_batch = max(1, workspace_elements // (pages * page_size * num_kv_heads * width))
        for start in range(0, num_tiles, per_batch):
            batches.append(_prepare_batch(config, group, slice(start, start + per_batch),
                                          rotation, limit))
    return CpuStep(tuple(batches), rotation)


def _merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Softmax over the union of two disjoint key sets from each set's output and LSE.

    out: [n, H, T, D], lse: [n, H, T] (natural log).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a * (lse_a - lse).exp_()[..., None]
            + out_b * (lse_b - lse).exp_()[..., None])


def _attend_batch(step: CpuStep, batch: TileBatch, query: torch.Tensor,
                  kv_cache: torch.Tensor, output: torch.Tensor, scale: float) -> None:
    rotation = step.rotation
    _, num_kv_heads, page_size, width = kv_cache.shape
    head_dim = width // 2
    n, _, num_queries, num_keys = batch.near_mask.shape
    num_heads = query.shape[1]

    # Gather the tiles' pages head by head into [Hkv, n * P, B, 2D]: the flash attention
    # wants keys as [n, Hkv, P * B, D] and a gather along the block dim copies whole pages.
    pages = step.buffer("pages", (num_kv_heads, batch.blocks.numel(), page_size, width),
                        kv_cache.dtype)
    for head in range(num_kv_heads):
        torch.index_select(kv_cache[:, head], 0, batch.blocks, out=pages[head])
    pages = pages.view(num_kv_heads, n * num_keys, width).float()
    pages.index_fill_(1, batch.unseen_slots, 0.0)
    pages = pages.view(num_kv_heads, n, num_keys, width)
    stored_keys, values = pages[..., :head_dim], pages[..., head_dim:]

    page_view = lambda x: x.view(num_kv_heads, n, -1, page_size, head_dim)
    near_keys = step.buffer("near_keys", (num_kv_heads, n, num_keys, head_dim), torch.float32)
    rotate_into(page_view(near_keys), page_view(stored_keys), batch.key_cos, batch.key_sin,
                rotation.is_neox_style)

    q = query[batch.rows].float().view(n, num_queries, num_heads, head_dim)
    q_near = q
    if batch.near_cos is not None:
        q_near = torch.empty_like(q)
        rotate_into(q_near, q, batch.near_cos, batch.near_sin, rotation.is_neox_style)
    heads_first = lambda x: x.transpose(0, 1)                       # [Hkv, n, ..] -> [n, Hkv, ..]
    out, lse = _flash_attention(q_near.transpose(1, 2), heads_first(near_keys),
                                heads_first(values), attn_mask=batch.near_mask, scale=scale)
    if batch.far_mask is not None:
        far_keys = batch.far_mask.shape[-1]
        q_far = torch.empty_like(q)
        rotate_into(q_far, q, batch.far_cos, batch.far_sin, rotation.is_neox_style)
        out_far, lse_far = _flash_attention(
            q_far.transpose(1, 2), heads_first(stored_keys[:, :, :far_keys]),
            heads_first(values[:, :, :far_keys]), attn_mask=batch.far_mask, scale=scale)
        out = _merge_by_lse(out, lse, out_far, lse_far + batch.far_row_bias)
    output[batch.rows] = out.transpose(1, 2).reshape(-1, num_heads, head_dim).to(output.dtype)


def attend(step: CpuStep, query: torch.Tensor, kv_cache: torch.Tensor,
           output: torch.Tensor, scale: float) -> None:
    """Λ-attention for every query of the step. query, output: [T_all, H, D]."""
    for batch in step.batches:
        _attend_batch(step, batch, query, kv_cache, output, scale)
