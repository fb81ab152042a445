"""StepPlanner: plans built into memory allocated once, equal to a fresh plan, fixed decode
shapes and addresses (what CUDA graphs replay), padding, and the checks that fail loudly.

Settings: B = 16, n_global = 40 (G = 3, not page-aligned), n_local = 100, chunk cap 48,
so R = ceil(147 / 16) + 1 = 11 and a request's row is G + R = 14 blocks.
"""

import numpy as np
import pytest
import torch

from lminf_vllm import attention
from lminf_vllm.attention import reference
from lminf_vllm.attention.plan import (PADDING_BLOCK, PADDING_PAGE_BASE, StepPlanner,
                                       build_plan, decode_pages, max_tile_pages, visible_pages)
from lminf_vllm.config import LMInfConfig

CONFIG = LMInfConfig(n_global=40, n_local=100, trained_length=128, page_size=16,
                     max_prefill_chunk_tokens=48)
WIDTH = CONFIG.num_pinned_pages + CONFIG.num_ring_pages
MAX_REQS, MAX_TOKENS = 4, 64


def planner(**overrides):
    kwargs = dict(max_num_reqs=MAX_REQS, max_num_tokens=MAX_TOKENS, device="cpu",
                  num_ring_pages=CONFIG.num_ring_pages, tile_queries=16)
    return StepPlanner(CONFIG, **(kwargs | overrides))


def block_table(num_reqs=MAX_REQS):
    # block 0 is vLLM's null block: no request owns it
    return (1 + torch.randperm(num_reqs * WIDTH, generator=torch.Generator().manual_seed(0))
            ).view(num_reqs, WIDTH).int()


def fields(plan):
    return [plan.slot_block, plan.slot_offset] + [
        x for g in plan.groups
        for x in (g.query_rows, g.query_position, g.page_block, g.page_base, g.n_global,
                  g.n_local)]


def random_steps(num_steps, seed=0):
    """Steps of a mixed batch: (query_start_loc, seq_lens); contexts grow past the ring."""
    rng = np.random.default_rng(seed)
    context = rng.integers(0, 400, MAX_REQS)
    for _ in range(num_steps):
        num_reqs = int(rng.integers(1, MAX_REQS + 1))
        budget = MAX_TOKENS
        query_lens = []
        for _ in range(num_reqs):
            q = int(rng.choice([1, 1, rng.integers(1, CONFIG.max_prefill_chunk_tokens + 1)]))
            q = min(q, budget - (num_reqs - len(query_lens) - 1))
            query_lens.append(q)
            budget -= q
        context[:num_reqs] += query_lens
        yield np.concatenate([[0], np.cumsum(query_lens)]), context[:num_reqs].copy()


def test_every_step_equals_a_fresh_plan_in_reused_memory():
    p = planner()
    table = block_table()
    arena, blocks = p.arena.data_ptr(), p.blocks.data_ptr()
    for qsl, seq_lens in random_steps(60):
        plan = p.plan(qsl, seq_lens, table[: len(seq_lens)])
        fresh = build_plan(CONFIG, qsl, seq_lens, table[: len(seq_lens)],
                           num_ring_pages=CONFIG.num_ring_pages, tile_queries=16)
        assert len(plan.groups) == len(fresh.groups)
        for got, expected in zip(fields(plan), fields(fresh)):
            assert torch.equal(got, expected)
        # no allocation per step: every plan tensor is a view of the planner's two buffers
        for x in fields(plan):
            base = x.untyped_storage().data_ptr()
            assert base in (arena, blocks)
        assert (p.arena.data_ptr(), p.blocks.data_ptr()) == (arena, blocks)


def test_memory_is_sized_by_the_batch_limits_and_the_window_not_the_stream():
    p = planner()
    tile_pages = max_tile_pages(CONFIG, 16)
    # per token 4 entries; per tile its pages' index and base, and its n_global, n_local
    assert p.capacity == 4 * MAX_TOKENS + 2 * (MAX_REQS + MAX_TOKENS // 16) * (tile_pages + 1)
    # the same planner plans a step at position 2e8 (ring rows)
    plan = p.plan(np.array([0, 1, 49]), np.array([200_000_000, 199_999_000]), block_table(2))
    assert plan.groups[0].query_position.max() == 200_000_000 - 1
    assert plan.slot_block.shape == (49,)


def test_the_slot_mapping_follows_the_ring():
    p = planner()
    position = np.arange(300, 348)
    plan = p.plan(np.array([0, 48]), np.array([348]), block_table(1))
    page = position // 16
    column = np.where(page < 3, page, 3 + (page - 3) % CONFIG.num_ring_pages)
    assert plan.slot_block.tolist() == block_table(1)[0, column].tolist()
    assert plan.slot_offset.tolist() == (position % 16).tolist()


def test_decode_steps_keep_one_shape_and_one_address_across_a_ring_wrap():
    p = planner(min_pages=decode_pages(CONFIG))
    table = block_table()
    seen = None
    ring_tokens = CONFIG.num_ring_pages * CONFIG.page_size
    for step in range(0, 2 * ring_tokens, 7):
        seq_lens = np.array([1, 17, 140, 300]) + step
        plan = p.plan(np.arange(MAX_REQS + 1), seq_lens, table)
        (group,) = plan.groups
        assert group.page_block.shape == (MAX_REQS, decode_pages(CONFIG))
        fresh = build_plan(CONFIG, np.arange(MAX_REQS + 1), seq_lens, table,
                           num_ring_pages=CONFIG.num_ring_pages,
                           min_pages=decode_pages(CONFIG))
        for got, expected in zip(fields(plan), fields(fresh)):
            assert torch.equal(got, expected)
        addresses = [x.data_ptr() for x in fields(plan)]
        assert seen is None or addresses == seen
        seen = addresses


def test_decode_pages_is_the_widest_decode_page_set():
    positions = np.arange(0, 2000)
    widest = visible_pages(positions, positions, CONFIG.page_size, CONFIG.n_global,
                           CONFIG.n_local).shape[1]
    assert widest == decode_pages(CONFIG)


def test_graph_padding_requests_get_tiles_on_their_padding_rows():
    p = planner(min_pages=decode_pages(CONFIG))
    table = block_table()
    # two real decodes, two padding requests (no query) and two padding tokens, as vLLM
    # pads a decode batch to a captured size
    plan = p.plan(np.array([0, 1, 2, 2, 2]), np.array([150, 33, 0, 0]), table, num_tokens=4)
    (group,) = plan.groups
    assert group.query_rows[:, 0].tolist() == [0, 1, 2, 3]
    assert group.query_position[:, 0].tolist() == [149, 32, 0, 0]
    assert (group.page_block[2:] == PADDING_BLOCK).all()
    assert group.page_base[2:, 0].tolist() == [0, 0]
    assert (group.page_base[2:, 1:] == PADDING_PAGE_BASE).all()
    assert (group.page_block[:2] != PADDING_BLOCK).all()   # real tiles never read it
    assert plan.slot_block[2:].tolist() == [PADDING_BLOCK] * 2
    assert plan.slot_offset[2:].tolist() == [0, 0]


def test_padding_tokens_of_a_mixed_batch_store_into_the_padding_block():
    plan = planner().plan(np.array([0, 5, 6]), np.array([5, 200]), block_table(2),
                          num_tokens=9)
    assert plan.slot_block[6:].tolist() == [PADDING_BLOCK] * 3
    assert sorted(torch.cat([g.query_rows.flatten() for g in plan.groups]).tolist()) == \
        list(range(6))


def test_a_step_longer_than_the_chunk_cap_fails_naming_it():
    with pytest.raises(ValueError, match="max_prefill_chunk_tokens=48"):
        planner().plan(np.array([0, 1, 50]), np.array([10, 300]), block_table(2))


def test_a_step_past_the_planned_batch_limits_fails():
    with pytest.raises(ValueError, match="max_num_reqs / max_num_tokens"):
        planner(max_num_tokens=8, max_num_reqs=1).plan(np.array([0, 48]), np.array([300]),
                                                       block_table(1))


def test_in_place_plans_drive_the_reference_exactly_like_fresh_plans():
    """A decode stream across a ring wrap, planned in place, gives the outputs of fresh
    plans bit for bit (the CPU half of tests/gpu/test_graph_replay.py)."""
    g = torch.Generator().manual_seed(1)
    num_blocks = 1 + MAX_REQS * WIDTH
    table = block_table()
    heads, kv_heads, head_dim = 4, 2, 16
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(CONFIG.trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    rotation = attention.QueryRotation(torch.cat([angle.cos(), angle.sin()], 1).float(),
                                       head_dim, True)
    caches = [torch.randn(num_blocks, kv_heads, 16, 2 * head_dim, generator=g)
              for _ in range(2)]
    caches[1].copy_(caches[0])
    p = planner(min_pages=decode_pages(CONFIG))
    start = np.array([90, 200, 333, 5])
    for step in range(CONFIG.num_ring_pages * CONFIG.page_size + 20):
        seq_lens = start + step
        q = torch.randn(MAX_REQS, heads, head_dim, generator=g)
        k, v = (torch.randn(MAX_REQS, kv_heads, head_dim, generator=g) for _ in range(2))
        outs = []
        for cache, plan in zip(caches, (
                p.plan(np.arange(MAX_REQS + 1), seq_lens, table),
                build_plan(CONFIG, np.arange(MAX_REQS + 1), seq_lens, table,
                           num_ring_pages=CONFIG.num_ring_pages,
                           min_pages=decode_pages(CONFIG)))):
            attention.write_kv(plan, k, v, cache)
            out = torch.empty_like(q)
            reference.attend(plan, q, cache, out, rotation, 0.25)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), f"step {step}"


def test_per_request_settings_keep_a_decode_batch_in_one_group_at_the_same_addresses():
    """Narrowed n_global / n_local travel per tile: a decode batch that mixes them has the
    one shape and the addresses a CUDA graph captured with the engine's values, and its
    pages are those each request's own values make visible."""
    p = planner(min_pages=decode_pages(CONFIG))
    table = block_table()
    seq_lens = np.array([150, 333, 90, 400])
    plain = p.plan(np.arange(MAX_REQS + 1), seq_lens, table)
    shapes = [tuple(x.shape) for x in fields(plain)]
    addresses = [x.data_ptr() for x in fields(plain)]
    p.plan(np.arange(MAX_REQS + 1), seq_lens, table)  # the other host arena (CUDA: two)
    n_global, n_local = np.array([40, 0, 17, 1]), np.array([100, 1, 33, 64])
    mixed = p.plan(np.arange(MAX_REQS + 1), seq_lens, table, n_global=n_global,
                   n_local=n_local)
    assert [tuple(x.shape) for x in fields(mixed)] == shapes
    assert [x.data_ptr() for x in fields(mixed)] == addresses
    (group,) = mixed.groups
    assert group.n_global.tolist() == n_global.tolist()
    assert group.n_local.tolist() == n_local.tolist()
    expected = visible_pages(seq_lens - 1, seq_lens - 1, CONFIG.page_size, n_global, n_local,
                             decode_pages(CONFIG))
    bases = np.where(expected < 0, PADDING_PAGE_BASE, expected * CONFIG.page_size)
    assert group.page_base.tolist() == bases.tolist()


@pytest.mark.parametrize("name, n_global, n_local", [
    ("n_global", [41, 40], None), ("n_global", [-1, 0], None),
    ("n_local", None, [100, 101]), ("n_local", None, [0, 5])])
def test_per_request_values_outside_the_engine_range_fail_naming_the_setting(
        name, n_global, n_local):
    allowed = {"n_global": r"\[0, 40\]", "n_local": r"\[1, 100\]"}[name]
    with pytest.raises(ValueError, match=f"per-request {name} must give {allowed}"):
        planner().plan(np.array([0, 1, 2]), np.array([10, 300]), block_table(2),
                       n_global=n_global, n_local=n_local)
