"""Λ-attention over the paged cache: planning plus the path chosen by config and device."""

import numpy as np
import torch

from lminf_vllm.attention.plan import (DEFAULT_TILE_QUERIES, AttentionPlan, StepPlanner,
                                       TileGroup, build_plan, decode_pages, max_tile_pages)
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.attention import cpu_attention, reference
from lminf_vllm.config import LMInfConfig, LMInfConfigError

__all__ = ["AttentionPlan", "TileGroup", "QueryRotation", "StepPlanner", "build_plan",
           "check_impl", "decode_pages", "exercise_worst_case", "impl_for", "plan_tile_queries",
           "rotation_for", "run", "worst_case_prefill", "write_kv"]


def impl_for(config: LMInfConfig, device: torch.device) -> str:
    """The path that runs on `device`: "triton", "cpu" (cpu_attention) or "reference"
    (config.attention_impl, where "auto" means the kernels on CUDA and cpu_attention
    elsewhere)."""
    if config.attention_impl != "auto":
        return config.attention_impl
    return "triton" if torch.device(device).type == "cuda" else "cpu"


def check_impl(config: LMInfConfig, device: torch.device, triton_interpreted: bool) -> str:
    """impl_for, refused at startup where it cannot run."""
    impl = impl_for(config, device)
    if impl == "triton" and torch.device(device).type != "cuda" and not triton_interpreted:
        raise LMInfConfigError(
            f"lminf: attention_impl='triton' on a {torch.device(device).type} device needs "
            "the Triton interpreter: set TRITON_INTERPRET=1 in the environment the engine "
            "starts from (before anything imports triton), or use attention_impl='auto' or "
            "'reference'")
    if impl == "cpu":
        cpu_attention.kernel()  # built (or refused, naming what is missing) at startup
    return impl


def plan_tile_queries(config: LMInfConfig, device: torch.device) -> int:
    """Queries per plan tile for the path that runs on `device`.

    Triton: a whole request chunk per tile, so the prefill kernel turns each window key
    once per step (triton_prefill.turn_pages_kernel) and every row block of the chunk reads
    that copy. cpu_attention: a whole chunk too (its kernel blocks the queries itself).
    Reference: its tile height, which bounds its [T, P, H, D] temporaries.
    """
    impl = impl_for(config, device)
    if impl == "triton":
        return config.max_prefill_chunk_tokens
    if impl == "cpu":
        return cpu_attention.tile_queries(config)
    return DEFAULT_TILE_QUERIES


def rotation_for(rotation: QueryRotation, config: LMInfConfig,
                 device: torch.device) -> QueryRotation:
    """The query rotation table on `device`, with every angle that device's path reads."""
    impl = impl_for(config, device)
    if impl == "reference":  # turns queries by query_angle: the model's L + 1 rows serve
        return rotation.to(device)
    if impl == "cpu":
        rows = cpu_attention.angles_needed(config)
    else:
        from lminf_vllm.attention.triton_prefill import angles_needed  # imports triton
        rows = angles_needed(config, plan_tile_queries(config, device))
    return rotation.with_angles(rows).to(device)


def write_kv(plan: AttentionPlan, key, value, kv_cache) -> None:
    """Store the step's new keys (already in the page-local frame) and values: the cpu
    path's kernel, else the reference's indexed assignment (one op per tensor on CUDA)."""
    if impl_for(plan.config, key.device) == "cpu":
        cpu_attention.write_kv(plan, key, value, kv_cache)
        return
    reference.write_kv(key, value, kv_cache, plan.slot_block, plan.slot_offset)


def run(plan: AttentionPlan, query, kv_cache, output, rotation: QueryRotation,
        scale: float) -> None:
    """Attention for every query of the step, written into output [T, H, D].

    The Triton path sends each group to a kernel (decode groups, one query per tile, to
    triton_decode; the rest to triton_prefill), which writes its rows of output directly;
    the cpu path to cpu_attention's fused kernel; the reference path to reference.attend, the oracle-checked statement of the
    semantics that the other paths are tested against. All read the same plan, so the
    paths differ only in this call.
    """
    impl = impl_for(plan.config, query.device)
    if impl == "reference":
        reference.attend(plan, query, kv_cache, output, rotation, scale)
        return
    if impl == "cpu":
        cpu_attention.attend(plan, query, kv_cache, output, rotation, scale)
        return
    from lminf_vllm.attention import triton_decode, triton_prefill  # imports triton
    for group in plan.groups:
        kernel = triton_decode if group.query_rows.shape[1] == 1 else triton_prefill
        kernel.attend_group(plan, group, query, kv_cache, rotation, scale, output=output)


def worst_case_prefill(config: LMInfConfig, max_num_reqs: int,
                       max_num_tokens: int) -> tuple[int, int]:
    """(tiles, queries per tile) of the prefill group whose page sets are largest.

    A group of N tiles of T >= 2 queries holds N * max_tile_pages(T) pages, which the
    prefill kernel copies densely (turned keys and values); N <= max_num_reqs and
    N * T <= max_num_tokens, with T <= max_prefill_chunk_tokens.
    """
    longest = min(config.max_prefill_chunk_tokens, max_num_tokens)
    if longest < 2:
        return 0, 0
    lengths = np.arange(2, longest + 1)
    tiles = np.minimum(max_num_reqs, max_num_tokens // lengths)
    best = int(np.argmax(tiles * max_tile_pages(config, lengths)))
    return int(tiles[best]), int(lengths[best])


def exercise_worst_case(config: LMInfConfig, query: torch.Tensor, output: torch.Tensor,
                        num_kv_heads: int, rotation: QueryRotation, scale: float,
                        max_num_reqs: int) -> AttentionPlan | None:
    """Run the step whose temporaries are largest, over a scratch cache, so that a memory
    profile taken around it (vLLM's profile run) sees them; returns its plan.

    query, output: [max_num_tokens, H, D], the profile run's own tensors. The worst prefill
    group (worst_case_prefill) runs with every window full; its tiles share one scratch
    row of pages, since only the shapes matter.
    """
    num_tiles, length = worst_case_prefill(config, max_num_reqs, query.shape[0])
    if num_tiles == 0:
        return None
    width = max_tile_pages(config, length)
    head_dim = query.shape[-1]
    scratch = torch.zeros(width, num_kv_heads, config.page_size, 2 * head_dim,
                          dtype=query.dtype, device=query.device)
    block_table = torch.arange(width, dtype=torch.int32, device=query.device)
    query_start_loc = np.arange(num_tiles + 1) * length
    # The window starts on the last slot of the first page after the global ones, so each
    # tile's n_local + T - 1 keys touch as many pages as they can.
    window_start = config.num_pinned_pages * config.page_size + config.page_size - 1
    seq_len = window_start + config.n_local - 1 + length
    plan = build_plan(config, query_start_loc, np.full(num_tiles, seq_len),
                      block_table.expand(num_tiles, width),
                      num_ring_pages=width - config.num_pinned_pages, tile_queries=length)
    rows = num_tiles * length
    run(plan, query[:rows], scratch, output[:rows], rotation, scale)
    return plan
