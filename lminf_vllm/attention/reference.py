"""Λ-attention over the paged cache in PyTorch: the CPU serving path and the kernels' reference.

Cache page format (owned by this plugin, read only by its own code):
    kv_cache: [num_blocks, num_kv_heads, B, 2 * head_dim]; keys in [..., :head_dim] and
    values in [..., head_dim:], keys stored rotated by their page offset j mod B.
"""

from __future__ import annotations

import torch

from lminf_vllm import rope_frame
from lminf_vllm.attention.plan import AttentionPlan, TileGroup
from lminf_vllm.attention.rotation import QueryRotation, rotate


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_block: torch.Tensor, slot_offset: torch.Tensor) -> None:
    """Store new keys and values. key, value: [T, Hkv, D]; slot_block, slot_offset: [T]."""
    head_dim = key.shape[-1]
    kv_cache[slot_block, :, slot_offset, :head_dim] = key.to(kv_cache.dtype)
    kv_cache[slot_block, :, slot_offset, head_dim:] = value.to(kv_cache.dtype)


def key_visibility(plan: AttentionPlan, group: TileGroup) -> torch.Tensor:
    """[N, T, P, B] bool: the Λ mask of each query against each key slot of its pages, with
    each tile's own n_global and n_local."""
    config = plan.config
    key_position = (group.page_base[:, :, None]
                    + torch.arange(config.page_size, device=group.page_base.device))
    t = group.query_position[:, :, None, None]
    per_tile = lambda x: x[:, None, None, None]                       # [N] -> [N, 1, 1, 1]
    mask = rope_frame.visible(t, key_position[:, None], per_tile(group.n_global),
                              per_tile(group.n_local))
    return mask & (group.page_base >= 0)[:, None, :, None]


def _logits_per_page_rotation(plan, group, q, key, rotation):
    """[N, Hkv, g, T, P, B] logits, turning each query once per page (DESIGN §3).

    Cheapest for few queries per tile (decode): T * P query rotations.
    """
    config = plan.config
    n, t, num_heads, head_dim = q.shape
    num_kv_heads = key.shape[2]
    angle = rope_frame.query_angle(group.query_position[:, :, None], group.page_base[:, None, :],
                                   config.page_size, config.trained_length)   # [N, T, P]
    # Pages after a query (later in its tile) are masked; bound their angles to the table.
    cos, sin = rotation.cos_sin_of(angle.clamp(min=1 - config.page_size))
    q_rot = rotate(q[:, :, None], cos[..., None, :], sin[..., None, :],
                   rotation.is_neox_style)                            # [N, T, P, H, D]
    q_rot = q_rot.view(n, t, -1, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return torch.einsum("ntpkgd,npkbd->nkgtpb", q_rot, key)


def _logits_near_far(plan, group, q, key, rotation):
    """The same logits with two rotations per query and one per page (prefill tiles).

    With r the first page base of the tile: a page with t - b_p <= L ("near") sees the exact
    distance t - j, so the query is turned by page_base(t) - r and the page's keys by b_p - r
    (relative turn t - j); any other page ("far") sees L - (j mod B), so the query is turned
    to L - (t mod B) and the stored keys are used as they are. Both angles stay in [-L, L]
    while the tile spans at most L - B + 2 queries.
    """
    config = plan.config
    n, t, num_heads, head_dim = q.shape
    num_kv_heads = key.shape[2]
    page_size, trained_length = config.page_size, config.trained_length
    position = group.query_position                                   # [N, T]
    own_base = rope_frame.page_base(rope_frame.logical_page(position, page_size), page_size)
    tile_base = own_base[:, :1]
    key_angle = (group.page_base - tile_base).clamp(-trained_length, trained_length)
    cos, sin = rotation.cos_sin_of(key_angle)                         # [N, P, rot / 2]
    key_near = rotate(key, cos[:, :, None, None], sin[:, :, None, None], rotation.is_neox_style)
    angles = torch.stack([own_base - tile_base,
                          trained_length - rope_frame.key_frame_position(position, page_size)])
    cos, sin = rotation.cos_sin_of(angles)                            # [2, N, T, rot / 2]
    q_near, q_far = rotate(q, cos[..., None, :], sin[..., None, :], rotation.is_neox_style)
    grouped = lambda x: x.view(n, t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    near = torch.einsum("ntkgd,npkbd->nkgtpb", grouped(q_near), key_near)
    far = torch.einsum("ntkgd,npkbd->nkgtpb", grouped(q_far), key)
    is_near = (position[:, :, None] - group.page_base[:, None, :]) <= trained_length
    return torch.where(is_near[:, None, None, :, :, None], near, far)


def attend_group(plan: AttentionPlan, group: TileGroup, query: torch.Tensor,
                 kv_cache: torch.Tensor, rotation: QueryRotation, scale: float) -> torch.Tensor:
    """Λ-attention of one tile group. query: [T_all, H, D]; returns [N, T, H, D] float32."""
    config = plan.config
    num_kv_heads, head_dim = kv_cache.shape[1], kv_cache.shape[3] // 2
    q = query[group.query_rows].float()                              # [N, T, H, D]
    n, t, num_heads, _ = q.shape
    pages = kv_cache[group.page_block].float()                       # [N, P, Hkv, B, 2D]
    key, value = pages[..., :head_dim], pages[..., head_dim:]

    # Per-page query turns cost T * H rotations per page, per-page key turns B * Hkv: pick
    # the cheaper form; both give the logits of DESIGN §2 exactly.
    fits_near_far = t + config.page_size - 2 <= config.trained_length
    if fits_near_far and t * num_heads > config.page_size * num_kv_heads:
        logits = _logits_near_far(plan, group, q, key, rotation)
    else:
        logits = _logits_per_page_rotation(plan, group, q, key, rotation)
    logits = logits * scale
    visibility = key_visibility(plan, group)                          # [N, T, P, B]
    logits = logits.masked_fill(~visibility[:, None, None], float("-inf"))
    probs = torch.softmax(logits.flatten(-2), dim=-1).view_as(logits)
    # Slots no query of the tile sees may hold anything (a page's unwritten tail, an
    # evicted ring page, a fresh block never zeroed): 0 * nan would still poison the sum.
    seen = visibility.any(dim=1)[:, :, None, :, None]                # [N, P, 1, B, 1]
    value = torch.where(seen, value, 0.0)
    out = torch.einsum("nkgtpb,npkbd->ntkgd", probs, value)
    return out.reshape(n, t, num_heads, head_dim)


def attend(plan: AttentionPlan, query: torch.Tensor, kv_cache: torch.Tensor,
           output: torch.Tensor, rotation: QueryRotation, scale: float) -> None:
    """Λ-attention for every query of the step. query, output: [T_all, H, D]."""
    for group in plan.groups:
        output[group.query_rows] = attend_group(plan, group, query, kv_cache, rotation,
                                                scale).to(output.dtype)
