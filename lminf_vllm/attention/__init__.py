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
    """Attention for every query of the step, written into output [T, H, D]."""
    reference.attend(plan, query, kv_cache, output, rotation, scale)
