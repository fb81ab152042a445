"""The CPU kernel's half-precision paths against its float32 path and the reference.

The float32 kernel is held to the float64 oracle in test_reference.py; here the same
numbers, from bf16 and fp16 caches and queries (converted page by page inside the kernel),
must match the reference run in float32 on the same rounded values.
"""

import numpy as np
import pytest
import torch

import oracle
from lminf_vllm.attention import QueryRotation, build_plan, cpu_attention, reference, write_kv
from lminf_vllm.config import LMInfConfig


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches_match_the_float32_reference(dtype):
    torch.manual_seed(0)
    page_size, heads, kv_heads, head_dim, trained_length = 16, 4, 2, 32, 64
    config = LMInfConfig(8, 40, trained_length, page_size, 64)
    context, final = 200, 24
    inv_freq = oracle.default_inv_freq(head_dim)
    angles = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    rotation = QueryRotation.from_model_table(
        torch.cat([angles.cos(), angles.sin()], 1).float(), trained_length + 1, True)
    ring = config.num_ring_pages
    block_table = torch.randperm(config.num_pinned_pages + ring + 2)[None, :-2]
    cache = torch.zeros(config.num_pinned_pages + ring + 2, kv_heads, page_size, 2 * head_dim,
                        dtype=dtype)
    # Write the history through the ring in chunks, then attend with the last `final` queries.
    for start in range(0, context, 64):
        end = min(start + 64, context)
        plan = build_plan(config, np.array([0, end - start]), np.array([end]), block_table,
                          ring)
        write_kv(plan, torch.randn(end - start, kv_heads, head_dim).to(dtype),
                 torch.randn(end - start, kv_heads, head_dim).to(dtype), cache)
    plan = build_plan(config, np.array([0, final, final + 1]), np.array([context, context + 1]),
                      block_table.expand(2, -1), ring, tile_queries=final)
    query = torch.randn(final + 1, heads, head_dim).to(dtype)

    output = torch.empty_like(query)
    cpu_attention.attend(plan, query, cache, output, rotation, head_dim ** -0.5)
    expected = torch.empty(query.shape)
    reference.attend(plan, query.float(), cache.float(), expected, rotation, head_dim ** -0.5)
    assert output.dtype == dtype
    assert float((output.float() - expected).abs().max()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_kernel_matches_the_reference(dtype):
    """The kernel's write_kv stores what reference.write_kv stores, bit for bit, from the
    strided key/value views vLLM hands over (slices of one qkv tensor), including padding
    tokens sent to the padding block."""
    torch.manual_seed(0)
    page_size, kv_heads, head_dim, tokens = 16, 2, 32, 37
    config = LMInfConfig(8, 40, 64, page_size, 64)
    num_blocks = config.num_pinned_pages + config.num_ring_pages + 3
    # block 0 is the padding block (vLLM's null block), never a request's
    block_table = (1 + torch.randperm(num_blocks - 1))[None, :num_blocks - 3]
    plan = build_plan(config, np.array([0, tokens - 5]), np.array([100]), block_table,
                      config.num_ring_pages, num_tokens=tokens)
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim).to(dtype)
    key = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (4 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    shape = (num_blocks, kv_heads, page_size, 2 * head_dim)
    expected = torch.full(shape, float("nan"), dtype=dtype)
    written = expected.clone()
    reference.write_kv(key, value, expected, plan.slot_block, plan.slot_offset)
    cpu_attention.write_kv(plan, key, value, written)
    assert torch.equal(written.isnan(), expected.isnan())
    assert torch.equal(written.nan_to_num(), expected.nan_to_num())
    assert int((~written.isnan()).sum()) == tokens * kv_heads * 2 * head_dim - (
        5 - 1) * kv_heads * 2 * head_dim  # 5 padding tokens share one padding slot


def test_write_kv_kernel_refuses_a_slot_outside_the_cache():
    cache = torch.zeros(3, 1, 16, 8)
    plan = type("Plan", (), {"slot_block": torch.tensor([3]), "slot_offset": torch.tensor([0])})
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attention.write_kv(plan, torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), cache)
