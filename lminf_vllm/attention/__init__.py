"""Λ-attention over the paged cache: planning plus the path chosen by device."""

from lminf_vllm.attention.plan import AttentionPlan, TileGroup, build_plan
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.attention import reference

__all__ = ["AttentionPlan", "TileGroup", "QueryRotation", "build_plan", "run", "write_kv"]


def write_kv(plan: AttentionPlan, key, value, kv_cache) -> None:
    """Store the step's new keys (already in the page-local frame) and values."""
    reference.write_kv(key, value, kv_cache, plan.slot_mapping)


def run(plan: AttentionPlan, query, kv_cache, output, rotation: QueryRotation,
        scale: float) -> None:
    """Attention for every query of the step, written into output [T, H, D].

    On CUDA each group goes to a Triton kernel (decode groups, one query per tile, to
    triton_decode; the rest to triton_prefill); elsewhere to the PyTorch reference. Both read
    the same plan, so the paths differ only in this call.
    """
    if not query.is_cuda:
        reference.attend(plan, query, kv_cache, output, rotation, scale)
        return
    from lminf_vllm.attention import triton_decode, triton_prefill  # triton only on GPU
    for group in plan.groups:
        kernel = triton_decode if group.query_rows.shape[1] == 1 else triton_prefill
        result = kernel.attend_group(plan, group, query, kv_cache, rotation, scale)
        output[group.query_rows] = result.to(output.dtype)
