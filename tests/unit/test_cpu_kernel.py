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
