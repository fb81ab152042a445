"""Λ-attention over the paged cache: planning plus the path chosen by device."""

import torch

from lminf_vllm.attention.plan import DEFAULT_TILE_QUERIES, AttentionPlan, TileGroup, build_plan
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.attention import reference

__all__ = ["AttentionPlan", "TileGroup", "QueryRotation", "build_plan", "plan_tile_queries",
           "rotation_for", "run", "write_kv"]


def plan_tile_queries(config, device: torch.device) -> int:
    """Queries per plan tile for the path that runs on `device`.

    CUDA: a whole request chunk per tile, so the prefill kernel turns each window key once
    per step (triton_prefill.turn_pages_kernel) and every row block of the chunk reads that
    copy. CPU: the reference's tile height, which bounds its [T, P, H, D] temporaries.
    """
    if torch.device(device).type == "cuda":
        return config.max_prefill_chunk_tokens
    return DEFAULT_TILE_QUERIES


def rotation_for(rotation: QueryRotation, config, device: torch.device) -> QueryRotation:
    """The query rotation table on `device`, with every angle that device's path reads."""
    if torch.device(device).type == "cuda":
        from lminf_vllm.attention.triton_prefill import angles_needed  # triton only on GPU
        rotation = rotation.with_angles(
            angles_needed(config, plan_tile_queries(config, device)))
    return rotation.to(device)


def write_kv(plan: AttentionPlan, key, value, kv_cache) -> None:
    """Store the step's new keys (already in the page-local frame) and values."""
    reference.write_kv(key, value, kv_cache, plan.slot_mapping)


def run(plan: AttentionPlan, query, kv_cache, output, rotation: QueryRotation,
        scale: float) -> None:
    """Attention for every query of the step, written into output [T, H, D].

    On CUDA each group goes to a Triton kernel (decode groups, one query per tile, to
    triton_decode; the rest to triton_prefill, which writes its rows of output directly);
    elsewhere to the PyTorch reference. Both read the same plan, so the paths differ only in
    this call.
    """
    if not query.is_cuda:
        reference.attend(plan, query, kv_cache, output, rotation, scale)
        return
    from lminf_vllm.attention import triton_decode, triton_prefill  # triton only on GPU
    for group in plan.groups:
        if group.query_rows.shape[1] == 1:
            result = triton_decode.attend_group(plan, group, query, kv_cache, rotation, scale)
            output[group.query_rows] = result.to(output.dtype)
        else:
            triton_prefill.attend_group(plan, group, query, kv_cache, rotation, scale,
                                        output=output)
