"""The ring of pages in a real engine: constant KV pages per request, and every page back.

One in-process engine for the module (VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the EngineCore
in this process, so the tests read vLLM's own block pool, not our bookkeeping). The pool
is small (POOL_BLOCKS), so the second test also runs into real preemptions.

Settings: tiny model (L = 256), B = 16 (the automatic page size), n_global = 32 (G = 2),
n_local = 128 and the default chunk cap n_local = 128, so R = ceil(255 / 16) + 1 = 17 and
a request never holds more than G + R = 19 pages (304 tokens) however long it runs.
"""


import numpy as np
import pytest
from vllm import LLM, SamplingParams

from conftest import MODEL_DIR
from engine_checks import assert_close, engine_core_in_process, prompt_logprobs
from oracle import Float64Llama

TINY_L = 256
PAGE = 16
N_GLOBAL, N_LOCAL = 32, 128
PINNED, RING = 2, 17
PAGES_PER_REQUEST = PINNED + RING
NUM_LAYERS = 6
POOL_BLOCKS = 96
LONG_TOKENS = 64 * TINY_L
LONG_OUTPUT = 32


@pytest.fixture(scope="module")
def llm():
    with engine_core_in_process():
        engine = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
                     max_model_len=1_000_000, max_num_seqs=8, max_num_batched_tokens=512,
                     gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
                     num_gpu_blocks_override=POOL_BLOCKS,
                     additional_config={"lminf": {"n_global": N_GLOBAL, "n_local": N_LOCAL}})
    yield engine


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def external_id(internal_id: str) -> str:
    """The id a request was added with (vLLM appends '-<8 hex>' internally)."""
    return internal_id.rsplit("-", 1)[0]


def test_the_engine_uses_the_ring_spec(llm):
    scheduler = scheduler_of(llm)
    (group,) = scheduler.kv_cache_config.kv_cache_groups
    spec = group.kv_cache_spec
    assert type(spec).__name__ == "LMInfSpec"
    assert (spec.block_size, spec.num_pinned_pages, spec.num_ring_pages) == (PAGE, PINNED, RING)
    assert scheduler.scheduler_config.long_prefill_token_threshold == N_LOCAL
    assert not scheduler.cache_config.enable_prefix_caching


def _run(llm, requests, abort_at=None, check=None):
    """Drive the engine step by step. requests: {id: (prompt ids, SamplingParams)};
    abort_at: {id: step}; check(step) runs after each step. Returns {id: last output}."""
    engine = llm.llm_engine
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    abort_at = dict(abort_at or {})
    outputs, step = {}, 0
    while engine.has_unfinished_requests():
        due = [r for r, s in abort_at.items() if s <= step]
        if due:
            engine.abort_request(due)
            for r in due:
                del abort_at[r]
        for out in engine.step():
            outputs[out.request_id] = out
        step += 1
        if check is not None:
            check(step)
    return outputs


def test_long_stream_stays_in_its_ring_and_matches_the_oracle(llm, val_tokens):
    """One request streamed to 64L tokens (prompt + output) in a batch with short ones."""
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    long_prompt = val_tokens[:LONG_TOKENS - LONG_OUTPUT].tolist()
    rng = np.random.default_rng(1)
    shorts = {f"short-{i}": (val_tokens[s:s + n].tolist(),
                             SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
              for i, (s, n) in enumerate(zip(rng.integers(20_000, 100_000, 3), (5, 60, 150)))}
    short_pages = sum(-(-(len(p) + 16) // PAGE) for p, _ in shorts.values())
    requests = {"long": (long_prompt, SamplingParams(max_tokens=LONG_OUTPUT, temperature=0,
                                                     ignore_eos=True, prompt_logprobs=0)),
                **shorts}
    most_used = []

    def check(step):
        used = free_before - pool.get_num_free_blocks()
        most_used.append(used)
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        long_blocks = [len(blocks) for r, blocks in manager.req_to_blocks.items()
                       if external_id(r) == "long"]
        assert long_blocks or step > 1, f"step {step}: the long request holds no blocks"
        assert max(long_blocks, default=0) <= PAGES_PER_REQUEST, (
            f"step {step}: the long request holds {long_blocks} blocks")
        assert used <= PAGES_PER_REQUEST + short_pages, (
            f"step {step}: {used} pages in use > G + R + the short requests' pages")
        if not any(r.startswith("short") for r in scheduler.requests):
            assert used <= PAGES_PER_REQUEST, f"step {step}: long request alone holds {used}"

    outputs = _run(llm, requests, check=check)
    assert pool.get_num_free_blocks() == free_before
    long_out = outputs["long"]
    assert len(long_out.prompt_token_ids) + len(long_out.outputs[0].token_ids) == LONG_TOKENS
    assert max(most_used) >= PAGES_PER_REQUEST  # the ring really filled
    print(f"long stream of {LONG_TOKENS} tokens: at most {max(most_used)} pages in use, "
          f"G + R = {PAGES_PER_REQUEST}")

    # Positions past 32L, against the oracle on a shortened stream. Under Λ-attention the
    # last layer at a query depends only on the global prefix and the NUM_LAYERS windows
    # behind it, and only through distances and offsets in the page; so the global pages
    # followed by the stream from a page-aligned `start` give the same logprobs for queries
    # more than NUM_LAYERS * (n_local - 1) tokens after `start` (the shift is a multiple of
    # B, and every global key is at the clamped distance in both sequences).
    check_from = LONG_TOKENS - LONG_OUTPUT - 129
    start = (check_from - NUM_LAYERS * (N_LOCAL - 1) - PAGE) // PAGE * PAGE
    assert check_from > 32 * TINY_L
    short_stream = long_prompt[:N_GLOBAL] + long_prompt[start:]
    expected = Float64Llama(MODEL_DIR).prompt_logprobs(
        short_stream, mode="lminf", n_global=N_GLOBAL, n_local=N_LOCAL, L=TINY_L, B=PAGE)
    shift = start - N_GLOBAL
    got = prompt_logprobs(long_out)[check_from:]
    error = assert_close(got, expected[check_from - shift:], "past 32L", offset=check_from)
    print(f"prompt logprobs at positions {check_from}..{LONG_TOKENS - LONG_OUTPUT - 2}: "
          f"max |Δ| = {error:.2e}")


def test_aborts_and_preemptions_return_every_page(llm, val_tokens):
    """≥ 200 requests aborted at random points (before, at and after the ring wraps) in a
    pool small enough to preempt; the pool ends exactly as it began and the requests that
    ran to the end produce what they produce alone."""
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    rng = np.random.default_rng(2)
    num_requests, num_aborted = 260, 210
    requests = {}
    for i in range(num_requests):
        # prompts from 1 page to past the ring (304 tokens) so aborts land on every phase
        length = int(rng.choice([8, 40, 150, 300, 420]))
        begin = int(rng.integers(0, 140_000))
        requests[f"r{i}"] = (val_tokens[begin:begin + length].tolist(),
                             SamplingParams(max_tokens=int(rng.integers(2, 24)),
                                            temperature=0, ignore_eos=True))
    aborted = rng.choice(num_requests, num_aborted, replace=False)
    abort_at = {f"r{i}": int(rng.integers(0, 120)) for i in aborted}
    preempted = set()

    def check(step):
        preempted.update(external_id(r) for r, req in scheduler.requests.items()
                         if req.num_preemptions)
        assert pool.get_num_free_blocks() >= 0

    outputs = _run(llm, requests, abort_at=abort_at, check=check)
    assert pool.get_num_free_blocks() == free_before, "pages leaked"
    print(f"{num_aborted} aborted, {len(preempted)} preempted "
          f"({len(preempted - set(abort_at))} of them ran to the end), "
          f"pool restored to {free_before}")
    assert preempted, "the pool never ran short: no preemption was exercised"

    survivors = [r for r in requests if r not in abort_at
                 and outputs[r].finished and outputs[r].outputs[0].finish_reason == "length"]
    assert len(survivors) >= 20
    # the preempted survivors first: they resumed by recomputing their stream into new pages
    check_ids = sorted(survivors, key=lambda r: r not in preempted)[:12]
    alone = llm.generate([{"prompt_token_ids": requests[r][0]} for r in check_ids],
                         [requests[r][1] for r in check_ids], use_tqdm=False)
    for request_id, out in zip(check_ids, alone):
        assert list(outputs[request_id].outputs[0].token_ids) == \
            list(out.outputs[0].token_ids), f"{request_id} changed by the aborts/preemptions"
    assert pool.get_num_free_blocks() == free_before
