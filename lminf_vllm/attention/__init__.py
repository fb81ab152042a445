"""Λ-attention over the paged cache: planning plus the path chosen by device."""

import torch

from lminf_vllm.attention.plan import AttentionPlan, TileGroup, build_plan
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.attention import cpu_attention, reference

__all__ = ["AttentionPlan", "TileGroup", "QueryRotation", "build_plan", "plan_tile_queries",
           "prepare", "rotation_for", "run", "write_kv"]


def plan_tile_queries(config, device: torch.device) -> int:
    """Queries per plan tile for the path that runs on `device`.

    CUDA: a whole request chunk per tile, so the prefill kernel turns each window key once
    per step (triton_prefill.turn_pages_kernel) and every row block of the chunk reads that
    copy. CPU: cpu_attention's flash-attention tile, a share of the window.
    """
    if torch.device(device).type == "cuda":
        return config.max_prefill_chunk_tokens
    return cpu_attention.tile_queries(config)


def rotation_for(rotation: QueryRotation, config, device: torch.device) -> QueryRotation:
    """The query rotation table on `device`, with every angle that device's path reads."""
    if torch.device(device).type == "cuda":
        from lminf_vllm.attention.triton_prefill import angles_needed  # triton only on GPU
    else:
        angles_needed = cpu_attention.angles_needed
    rotation = rotation.with_angles(angles_needed(config, plan_tile_queries(config, device)))
    return rotation.to(device)


def prepare(plan: AttentionPlan, rotation: QueryRotation, num_kv_heads: int, head_dim: int):
    """What the path of the plan's device builds once per step for every layer (or None)."""
    if plan.slot_mapping.is_cuda:
        return None
    return cpu_attention.prepare(plan, rotation, num_kv_heads, head_dim)


def write_kv(plan: AttentionPlan, key, value, kv_cache) -> None:
    """Store the step's new keys (already in the page-local frame) and values."""
    reference.write_kv(key, value, kv_cache, plan.slot_mapping)


def run(plan: AttentionPlan, query, kv_cache, output, rotation: QueryRotation,
        scale: float, prepared=None) -> None:
    """Attention for every query of the step, written into output [T, H, D].

    On CUDA each group goes to a Triton kernel (decode groups, one query per tile, to
    triton_decode; the rest to triton_prefill, which writes its rows of output directly);
    elsewhere to cpu_attention, with `prepared` from `prepare` (made here when not given).
    All read the same plan, so the paths differ only in this call; reference.attend is the
    oracle-checked statement of the semantics that the paths are tested against.
    """
    if not query.is_cuda:
        if prepared is None:
            prepared = prepare(plan, rotation, kv_cache.shape[1], kv_cache.shape[3] // 2)
        cpu_attention.attend(prepared, query, kv_cache, output, scale)
        return
    from lminf_vllm.attention import triton_decode, triton_prefill  # triton only on GPU
    for group in plan.groups:
        if group.query_rows.shape[1] == 1:
            result = triton_decode.attend_group(plan, group, query, kv_cache, rotation, scale)
            output[group.query_rows] = result.to(output.dtype)
        else:
            triton_prefill.attend_group(plan, group, query, kv_cache, rotation, scale,
                                        output=output)
