"""The ring KV policy with vLLM's own objects: spec, registry, block pool, manager, scheduler.

No engine and no model: the scheduler is vLLM's, built by the scheduler simulation
(bench/bench_scheduler_sim.py) with the model replaced by a no-op.
Settings: B = 16, n_global = 32 (G = 2), n_local = 128, chunk cap 128 (R = 17).
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_scheduler_sim import blocks_of, build_scheduler, make_request, no_op_step  # noqa: E402

import lminf_vllm  # noqa: E402
from lminf_vllm.sessions import StoreCounters  # noqa: E402

# the stream-state store's counters, as an engine that kept no state reports them
STORE_IDLE = dataclasses.asdict(StoreCounters())

PAGE, N_GLOBAL, N_LOCAL = 16, 32, 128
PINNED, RING = 2, 17
PER_REQUEST = PINNED + RING
NUM_BLOCKS = 200


@pytest.fixture(scope="module", autouse=True)
def registered():
    lminf_vllm.register()


def make_scheduler(num_blocks=NUM_BLOCKS, max_num_seqs=8, max_num_batched_tokens=512,
                   receptive_field_prefill=True):
    scheduler, config = build_scheduler(
        max_model_len=200_000_000, block_size=PAGE, n_global=N_GLOBAL, n_local=N_LOCAL,
        trained_length=256, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, num_blocks=num_blocks,
        receptive_field_prefill=receptive_field_prefill)
    assert (config.num_pinned_pages, config.num_ring_pages) == (PINNED, RING)
    return scheduler


def ring_spec(**overrides):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from lminf_vllm.kv_cache import LMInfSpec

    base = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=64,
                             dtype=torch.float32)
    values = dict(num_pinned_pages=PINNED, num_ring_pages=RING) | overrides
    return LMInfSpec(**{f: getattr(base, f) for f in ("block_size", "num_kv_heads",
                                                      "head_size", "dtype")}, **values)


def test_spec_sizes_memory_and_rows_by_the_ring():
    spec = ring_spec()
    assert spec.max_memory_usage_bytes(None) == PER_REQUEST * spec.page_size_bytes
    assert spec.max_num_blocks_per_req(None, 200_000_000) == PER_REQUEST
    assert not spec.prefix_cacheable and not spec.uses_slot_mapping
    merged = type(spec).merge([spec, ring_spec()])
    assert merged == spec and type(merged) is type(spec)
    with pytest.raises(ValueError, match="disagree"):
        type(spec).merge([spec, ring_spec(num_ring_pages=RING + 1)])


def test_registry_maps_the_ring_spec_and_keeps_the_builtins():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from lminf_vllm.kv_cache import LMInfManager

    spec = ring_spec()
    assert KVCacheSpecRegistry.get_manager_class(spec) is LMInfManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is FullAttentionSpec
    plain = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=64,
                              dtype=torch.float32)
    assert KVCacheSpecRegistry.get_manager_class(plain) is FullAttentionManager


def test_scheduler_caps_a_lone_request_chunk_and_turns_prefix_caching_off():
    scheduler = make_scheduler()
    assert scheduler.scheduler_config.long_prefill_token_threshold == N_LOCAL
    assert not scheduler.cache_config.enable_prefix_caching
    scheduler.add_request(make_request("lone", [5] * 2000, max_tokens=2))
    for _ in range(5):
        scheduled = no_op_step(scheduler)
        assert scheduled["lone"] == N_LOCAL


@pytest.mark.parametrize("prompt_tokens", [1, PAGE, PER_REQUEST * PAGE - 1,
                                           PER_REQUEST * PAGE, 5000])
def test_a_request_holds_at_most_g_plus_r_and_returns_every_block(prompt_tokens):
    scheduler = make_scheduler()
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    scheduler.add_request(make_request("r", [5] * prompt_tokens, max_tokens=40))
    held = []
    while "r" in scheduler.requests:
        no_op_step(scheduler)
        held.append(free_before - pool.get_num_free_blocks())
    expected_peak = min(-(-(prompt_tokens + 39) // PAGE), PER_REQUEST)
    assert max(held) == expected_peak
    if PER_REQUEST in held:  # once full, the ring neither grows nor shrinks mid-stream
        assert set(held[held.index(PER_REQUEST):-1]) == {PER_REQUEST}
    assert pool.get_num_free_blocks() == free_before


def test_a_two_hundred_million_token_request_is_admitted_with_g_plus_r_blocks():
    # every token through the ring (receptive-field prefill would skip the middle)
    scheduler = make_scheduler(num_blocks=PER_REQUEST + 2, receptive_field_prefill=False)
    prompt = [5] * 200_000_000
    scheduler.add_request(make_request("huge", prompt, max_tokens=1))
    del prompt
    for _ in range(40):
        scheduled = no_op_step(scheduler)
        assert scheduled == {"huge": N_LOCAL}
        assert blocks_of(scheduler, "huge") <= PER_REQUEST
    assert blocks_of(scheduler, "huge") == PER_REQUEST
    scheduler.finish_requests("huge", _finished_status())
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == PER_REQUEST + 1


def _finished_status():
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def test_random_aborts_and_preemptions_restore_the_pool():
    """300 requests, 200 aborted at random steps, in a pool too small for all of them."""
    scheduler = make_scheduler(num_blocks=3 * PER_REQUEST)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(300)]
    for request_id in ids:
        length = int(rng.choice([3, 40, 200, 300, 304, 305, 700]))
        scheduler.add_request(make_request(request_id, [5] * length,
                                           max_tokens=int(rng.integers(1, 30))))
    abort_step = {r: int(rng.integers(0, 400)) for r in rng.choice(ids, 200, replace=False)}
    preempted, step = set(), 0
    while scheduler.requests:
        due = [r for r, s in abort_step.items() if s == step and r in scheduler.requests]
        if due:
            scheduler.finish_requests(due, _finished_status())
        no_op_step(scheduler)
        preempted.update(r for r, req in scheduler.requests.items() if req.num_preemptions)
        for request_id in scheduler.requests:
            assert blocks_of(scheduler, request_id) <= PER_REQUEST
        step += 1
    assert preempted, "no preemption happened; shrink the pool"
    assert pool.get_num_free_blocks() == free_before


def test_ring_slot_mapping_matches_the_table_slot_formula():
    from vllm.v1.worker.block_table import BlockTable

    from lminf_vllm import rope_frame
    from lminf_vllm.patches.ring_slot_mapping import RING_ATTR

    table = BlockTable(block_size=PAGE, max_num_reqs=3, max_num_blocks_per_req=PER_REQUEST,
                       max_num_batched_tokens=64, pin_memory=False,
                       device=torch.device("cpu"), cp_kv_cache_interleave_size=1)
    setattr(table, RING_ATTR, (PINNED, RING))
    rows = torch.randperm(3 * PER_REQUEST, dtype=torch.int32).view(3, PER_REQUEST) + 1
    table.block_table.cpu[:] = rows
    table.commit_block_table(3)
    # a prefill of 5 tokens straddling a wrap, a decode far past the ring, a short prefill
    positions = torch.tensor([300, 301, 302, 303, 304, 199_999_999, 0, 1, 2])
    query_start_loc = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    table.compute_slot_mapping(3, query_start_loc, positions)
    req = [0] * 5 + [1] + [2] * 3
    expected = [int(rows[r, rope_frame.table_slot(int(p) // PAGE, PINNED, RING)]) * PAGE
                + int(p) % PAGE for r, p in zip(req, positions)]
    assert table.slot_mapping.gpu[:9].tolist() == expected
    assert (table.slot_mapping.gpu[9:] == -1).all()


def test_ring_counters_reach_scheduler_stats():
    """The manager's counters, as patches/scheduler_stats_lminf.py hands them on each step."""
    from vllm.v1.metrics.stats import PrefixCacheStats

    scheduler = make_scheduler(receptive_field_prefill=False)  # the whole stream written
    # stats on, as `vllm serve` runs (the simulated scheduler is built with them off)
    scheduler.log_stats = scheduler.kv_cache_manager.log_stats = True
    scheduler.kv_cache_manager.prefix_cache_stats = PrefixCacheStats()
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]

    def stats():
        return scheduler.make_stats().lminf

    prompt_tokens, max_tokens = 5000, 40
    scheduler.add_request(make_request("r", [5] * prompt_tokens, max_tokens=max_tokens))
    no_op_step(scheduler)
    assert stats() == STORE_IDLE | dict(
        pages_pinned=PINNED, ring_pages=6, ring_pages_overwritten=0,
        tokens_past_trained_length=0, requests_past_trained_length=0, prompt_tokens_skipped=0,
        recompute_tokens=0, recompute_tokens_skipped=0)
    no_op_step(scheduler)
    no_op_step(scheduler)
    # three chunks of n_local = 128 tokens: 24 pages, 2 pinned, 17 in the ring, 5 overwritten
    assert stats() == STORE_IDLE | dict(
        pages_pinned=PINNED, ring_pages=RING, ring_pages_overwritten=5,
        tokens_past_trained_length=3 * 128 - 256, requests_past_trained_length=1,
        prompt_tokens_skipped=0, recompute_tokens=0,
        recompute_tokens_skipped=0)
    while "r" in scheduler.requests:
        no_op_step(scheduler)
    # the last sampled token is never written to the cache
    slots_written = prompt_tokens + max_tokens - 1
    assert stats() == STORE_IDLE | dict(
        pages_pinned=0, ring_pages=0,
        ring_pages_overwritten=-(-slots_written // PAGE) - PER_REQUEST,
        tokens_past_trained_length=slots_written - 256, requests_past_trained_length=0,
        prompt_tokens_skipped=0, recompute_tokens=0,
        recompute_tokens_skipped=0)
    assert stats() == STORE_IDLE | dataclasses.asdict(manager.counters)


def test_receptive_field_prefill_jumps_over_the_middle_of_a_prompt():
    """Two 5,000-token prompts side by side: "skips" jumps from its first chunk to its
    tail start b (the tiny model's 6 layers: R = 6 · 127 + 1 = 763, b = 4,224); "full"
    asks for prompt logprobs and computes every token. The counters count written slots."""
    from vllm.v1.metrics.stats import PrefixCacheStats

    from lminf_vllm.receptive_field import tail_start

    scheduler = make_scheduler()
    scheduler.log_stats = scheduler.kv_cache_manager.log_stats = True
    scheduler.kv_cache_manager.prefix_cache_stats = PrefixCacheStats()
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    prompt_tokens, max_tokens = 5000, 3
    start = tail_start(prompt_tokens, N_GLOBAL, N_LOCAL, 6, PAGE)
    assert start == 4224
    scheduler.add_request(make_request("skips", [5] * prompt_tokens, max_tokens=max_tokens))
    scheduler.add_request(make_request("full", [5] * prompt_tokens, max_tokens=max_tokens,
                                       prompt_logprobs=0))
    chunks = {"skips": [], "full": []}
    while scheduler.requests:
        computed = {r: scheduler.requests[r].num_computed_tokens for r in scheduler.requests}
        for request_id, tokens in no_op_step(scheduler).items():
            chunks[request_id].append((computed[request_id], tokens))

    def covered(request_chunks):
        return [p for first, tokens in request_chunks for p in range(first, first + tokens)]

    slots_written = prompt_tokens + max_tokens - 1  # the last sampled token is never written
    assert covered(chunks["skips"]) == [*range(N_LOCAL), *range(start, slots_written)]
    assert covered(chunks["full"]) == list(range(slots_written))
    assert pool.get_num_free_blocks() == free_before
    pages_written = {"skips": N_LOCAL // PAGE + -(-(slots_written - start) // PAGE),
                     "full": -(-slots_written // PAGE)}
    assert scheduler.make_stats().lminf == STORE_IDLE | dict(
        pages_pinned=0, ring_pages=0, requests_past_trained_length=0,
        prompt_tokens_skipped=start - N_LOCAL, recompute_tokens=0, recompute_tokens_skipped=0,
        ring_pages_overwritten=sum(pages - PER_REQUEST for pages in pages_written.values()),
        tokens_past_trained_length=(slots_written - start) + (slots_written - 256))


@pytest.mark.parametrize("case", ["skips", "prompt logprobs out", "prompt logprobs pending",
                                  "bound off"])
def test_a_preempted_stream_recomputes_its_prefix_and_last_tokens(case):
    """A 3,000-token prompt decoding, preempted by real pool pressure: request "c" (added
    first, so "long" is the victim) fills the pool's last page, needs one more in its last
    step and so preempts "long" at stream length N. The replay computes the first chunk
    and [b(N), N), b over the whole stream, prompt and output (R = 6 * 127 + 1 = 763);
    a request whose prompt logprobs are still due (preempted mid-prompt), or an engine
    with receptive-field prefill off, replays all of [0, N). Counted in the scheduler
    stats; the pool ends as it began."""
    from vllm.v1.metrics.stats import PrefixCacheStats
    from vllm.v1.request import RequestStatus

    from lminf_vllm.receptive_field import tail_start

    bounded = case in ("skips", "prompt logprobs out")
    prompt_logprobs = 0 if case.startswith("prompt logprobs") else None
    # c holds K pages and needs page K + 1 in its step D + 1 after its prompt, its last
    c_pages = 17
    c_steps = 10 if case == "prompt logprobs pending" else 200
    scheduler = make_scheduler(num_blocks=PER_REQUEST + c_pages,
                               receptive_field_prefill=case != "bound off")
    scheduler.log_stats = scheduler.kv_cache_manager.log_stats = True
    scheduler.kv_cache_manager.prefix_cache_stats = PrefixCacheStats()
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    prompt_tokens, max_tokens = 3000, 260
    scheduler.add_request(make_request("c", [7] * (PAGE * c_pages - c_steps),
                                       max_tokens=c_steps + 2))
    scheduler.add_request(make_request("long", [5] * prompt_tokens, max_tokens=max_tokens,
                                       prompt_logprobs=prompt_logprobs))
    long = scheduler.requests["long"]
    preempted_at, replay = None, []
    while scheduler.requests:
        computed = long.num_computed_tokens
        scheduled = no_op_step(scheduler)
        if preempted_at is None and long.status == RequestStatus.PREEMPTED:
            preempted_at = long.num_tokens
        elif preempted_at is not None and "long" in scheduled and computed < preempted_at:
            replay.append((computed, scheduled["long"]))
    assert long.num_preemptions == 1 and long.num_output_tokens == max_tokens
    if case == "prompt logprobs pending":
        assert preempted_at == prompt_tokens, "preempted after its prompt"
    else:
        assert preempted_at > prompt_tokens + 150, "preempted before its output grew"

    covered = [p for first, tokens in replay for p in range(first, first + tokens)]
    start = tail_start(preempted_at, N_GLOBAL, N_LOCAL, 6, PAGE) if bounded else 0
    assert start == (0 if not bounded else (preempted_at - 763) // PAGE * PAGE)
    expected = [*range(N_LOCAL), *range(start, preempted_at)] if bounded \
        else list(range(preempted_at))
    assert covered == expected
    stats = scheduler.make_stats().lminf
    first_prefill_skip = (tail_start(prompt_tokens, N_GLOBAL, N_LOCAL, 6, PAGE) - N_LOCAL
                          if case == "skips" else 0)
    assert stats["prompt_tokens_skipped"] == first_prefill_skip
    assert stats["recompute_tokens"] == len(expected)
    assert stats["recompute_tokens_skipped"] == preempted_at - len(expected)
    assert pool.get_num_free_blocks() == free_before


def test_kv_connectors_are_refused_with_the_reason():
    import copy
    import logging

    from vllm.config import KVTransferConfig

    from lminf_vllm.patches.prefill_chunk_cap import configure_scheduler

    vllm_config = copy.copy(make_scheduler().vllm_config)
    vllm_config.kv_transfer_config = KVTransferConfig(kv_connector="ExampleConnector",
                                                      kv_role="kv_both")
    with pytest.raises(ValueError, match="KV connectors"):
        configure_scheduler(vllm_config, logging.getLogger(__name__))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_token_buffers_are_committed_on_write_and_released_with_the_slot():
    """InputBatch at max_model_len = 2e8 and 64 slots: 64 GB of token buffers if committed."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    from lminf_vllm.lazy_memory import release_row
    from lminf_vllm.patches.bounded_buffers import LAZY_ROWS_ATTR

    rss_before = _rss_bytes()
    batch = InputBatch(max_num_reqs=64, max_model_len=200_000_000, max_num_batched_tokens=512,
                       device=torch.device("cpu"), vocab_size=8192, block_sizes=[PAGE],
                       max_num_blocks_per_req=[PER_REQUEST])
    assert batch.token_ids_cpu.shape == (64, 200_000_000)
    assert _rss_bytes() - rss_before < 256 << 20, "the token buffers were committed up front"
    rows = getattr(batch, LAZY_ROWS_ATTR)
    assert len(rows) == 2  # token ids and is_token_ids
    batch.token_ids_cpu[3, :5_000_000] = 7
    assert int(batch.token_ids_cpu[3, 4_999_999]) == 7 and int(batch.token_ids_cpu[2, 0]) == 0
    written = _rss_bytes()
    for tensor, mapping in rows:
        release_row(tensor, mapping, 3)
    # whole pages only: the partial pages at the row's two ends keep their (stale) ids,
    # which vLLM overwrites before reading, as it does without the patch
    assert int(batch.token_ids_cpu[3, 10_000]) == 0
    assert written - _rss_bytes() > 15 << 20  # the 20 MB written went back to the kernel
