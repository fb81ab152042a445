"""Bounded recovery in a real engine: a stream preempted past 32L resumes exactly.

vLLM preempts a request by freeing its pages and setting num_computed_tokens = 0; it then
recomputes its stream, prompt and output so far. patches/receptive_field_prefill.py makes
that replay compute its first chunk (the global prefix) and the last R = 6 · 255 + 1 =
1,531 tokens of the stream, from the page boundary b(N) (docs/design.md, "The receptive
field"). Here the preemption is real pool pressure: a filler request, admitted first,
holds FILLER_PAGES pages and needs one more in its last step, so the scheduler preempts
the newest running request, the long stream, at a point set by the filler's prompt length
(seeded random). The continued decode (greedy tokens and their logprobs) must equal one
uninterrupted request and the float64 oracle of the whole stream; the counters show what
the replay computed, and every page is back in the pool.

A request with prompt logprobs that is preempted before its first output recomputes every
token (its prompt logprobs are still due) and returns them exact; one preempted after its
first output has them already and skips like any other. A stream rebuilt from the token
ids a client resends (prompt and generated output as one prompt) is receptive-field
prefill, and continues exactly too.

One in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, to read the scheduler): the tiny
model (6 layers, L = 256), B = 16, n_global = 64 (G = 4), n_local = 256 and the default
256-token chunk cap (ring R = 33 pages), so a request holds at most 37 pages.
"""


import numpy as np
import pytest
from vllm import LLM, SamplingParams
from vllm.v1.request import RequestStatus

from conftest import MODEL_DIR
from engine_checks import (LMINF_ORACLE_KWARGS, TINY_L, assert_close, engine_core_in_process,
                           prompt_logprobs, sampled_logprobs)
from lminf_vllm.config import LMInfConfig
from lminf_vllm.receptive_field import request_tail_start
from oracle import Float64Llama

PAGE, N_GLOBAL, N_LOCAL, NUM_LAYERS = 16, 64, 256, 6
FIRST_CHUNK = N_LOCAL  # the chunk cap: a resumed request's first chunk
PER_REQUEST = 4 + 33
FILLER_PAGES = 16
PROMPT_TOKENS = 32 * TINY_L + 37  # past 32L, not page-aligned
OUTPUT_TOKENS = 120


@pytest.fixture(scope="module")
def llm():
    with engine_core_in_process():
        engine = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
                     max_model_len=PROMPT_TOKENS + OUTPUT_TOKENS + 64, max_num_seqs=4,
                     block_size=PAGE, gpu_memory_utilization=0.3, enforce_eager=True,
                     seed=0, num_gpu_blocks_override=PER_REQUEST + FILLER_PAGES,
                     additional_config={"lminf": {"n_global": N_GLOBAL}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def counters(llm) -> dict:
    """The engine's lminf counters, as make_stats hands them on (stats are off in LLM)."""
    from lminf_vllm.patches.scheduler_stats_lminf import ring_counters_of

    return ring_counters_of(scheduler_of(llm).kv_cache_manager)


def bounded_tail_start(stream_tokens: int) -> int:
    config = LMInfConfig(N_GLOBAL, N_LOCAL, TINY_L, PAGE, FIRST_CHUNK,
                         receptive_field_layers=NUM_LAYERS)
    return request_tail_start(config, stream_tokens, needs_every_output=False)


def long_params(prompt_logprobs=None):
    return SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, logprobs=0,
                          ignore_eos=True, prompt_logprobs=prompt_logprobs)


@pytest.fixture(scope="module")
def prompt(val_tokens):
    return val_tokens[20_000:20_000 + PROMPT_TOKENS].tolist()


@pytest.fixture(scope="module")
def uninterrupted(llm, prompt):
    out, = llm.generate([{"prompt_token_ids": prompt}], long_params(prompt_logprobs=0),
                        use_tqdm=False)
    return out


@pytest.fixture(scope="module")
def oracle_logprobs(prompt, uninterrupted):
    """log p(token i+1 | tokens 0..i) of the uninterrupted stream, float64, every position
    computed (no receptive field)."""
    stream = prompt + list(uninterrupted.outputs[0].token_ids)
    return Float64Llama(MODEL_DIR).prompt_logprobs(stream, **LMINF_ORACLE_KWARGS)


def run_preempted(llm, prompt, val_tokens, filler_steps: int, prompt_logprobs=None):
    """The long stream beside a filler that preempts it `filler_steps` decode steps in.
    Returns (the long stream's output, its stream length when preempted).

    The filler's prompt leaves it FILLER_PAGES - 1 pages or fewer at admission: beside a
    filler holding all FILLER_PAGES, vLLM's admission (which keeps headroom for running
    requests) did not admit the stream until the filler finished."""
    assert filler_steps >= PAGE
    engine = llm.llm_engine
    filler = val_tokens[90_000:90_000 + PAGE * FILLER_PAGES - filler_steps].tolist()
    engine.add_request("filler", {"prompt_token_ids": filler},
                       SamplingParams(max_tokens=filler_steps + 2, temperature=0,
                                      ignore_eos=True))
    engine.add_request("long", {"prompt_token_ids": prompt}, long_params(prompt_logprobs))
    scheduler = scheduler_of(llm)
    long_id, = [r for r in scheduler.requests if r.startswith("long")]
    long = scheduler.requests[long_id]
    outputs, preempted_at = {}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        if preempted_at is None and long.status == RequestStatus.PREEMPTED:
            preempted_at = long.num_tokens
    assert long.num_preemptions == 1, f"preempted {long.num_preemptions} times"
    return outputs["long"], preempted_at


def check_continued_decode(got, uninterrupted, oracle_logprobs, what):
    tokens = list(got.outputs[0].token_ids)
    assert tokens == list(uninterrupted.outputs[0].token_ids), f"{what}: greedy tokens differ"
    got_logprobs = sampled_logprobs(got)
    vs_uninterrupted = assert_close(got_logprobs, sampled_logprobs(uninterrupted),
                                    f"{what} vs uninterrupted")
    vs_oracle = assert_close(got_logprobs, oracle_logprobs[PROMPT_TOKENS - 1:],
                             f"{what} vs the float64 oracle", offset=PROMPT_TOKENS - 1)
    return vs_uninterrupted, vs_oracle


def test_the_uninterrupted_stream_matches_the_oracle(uninterrupted, oracle_logprobs):
    assert_close(sampled_logprobs(uninterrupted), oracle_logprobs[PROMPT_TOKENS - 1:],
                 "uninterrupted decode vs oracle", offset=PROMPT_TOKENS - 1)
    assert_close(prompt_logprobs(uninterrupted), oracle_logprobs[:PROMPT_TOKENS - 1],
                 "uninterrupted prompt vs oracle")


def test_a_stream_preempted_at_random_points_past_32L_resumes_exactly(
        llm, prompt, val_tokens, uninterrupted, oracle_logprobs):
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    rng = np.random.default_rng(13)
    # one point early, one mid-way and one late in the 120-token decode (which starts
    # about 9 steps in, after the stream's bounded first prefill)
    for filler_steps in (int(rng.integers(low, high)) for low, high in
                         ((16, 45), (45, 80), (80, 112))):
        before = counters(llm)
        got, stream = run_preempted(llm, prompt, val_tokens, filler_steps)
        after = counters(llm)
        assert stream > PROMPT_TOKENS, "preempted before its output began"
        start = bounded_tail_start(stream)
        assert start > FIRST_CHUNK
        recomputed = after["recompute_tokens"] - before["recompute_tokens"]
        skipped = after["recompute_tokens_skipped"] - before["recompute_tokens_skipped"]
        assert (recomputed, skipped) == (FIRST_CHUNK + stream - start, start - FIRST_CHUNK)
        assert recomputed <= FIRST_CHUNK + NUM_LAYERS * (N_LOCAL - 1) + 1 + PAGE
        errors = check_continued_decode(got, uninterrupted, oracle_logprobs,
                                        f"preempted at stream length {stream}")
        assert pool.get_num_free_blocks() == free_before, "pages leaked"
        print(f"preempted at {stream} tokens ({stream - PROMPT_TOKENS} output): recomputed "
              f"{recomputed}, skipped {skipped}; max |Δ logprob| vs uninterrupted "
              f"{errors[0]:.2e}, vs oracle {errors[1]:.2e}")


@pytest.mark.parametrize("when", ["mid-prompt", "after its first output"])
def test_prompt_logprobs_of_a_preempted_request(llm, prompt, val_tokens, uninterrupted,
                                                oracle_logprobs, when):
    """Preempted mid-prompt, its prompt logprobs are still due: every token is recomputed
    and they come out exact. Preempted after its first output, they are out already (the
    prefill that sampled it returned them): the replay skips."""
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    before = counters(llm)
    # the prompt takes 33 chunks of 256 tokens: the filler preempts at its step 20, or 70
    got, stream = run_preempted(llm, prompt, val_tokens,
                                filler_steps=20 if when == "mid-prompt" else 70,
                                prompt_logprobs=0)
    after = counters(llm)
    recomputed = after["recompute_tokens"] - before["recompute_tokens"]
    if when == "mid-prompt":
        assert stream == PROMPT_TOKENS and recomputed == PROMPT_TOKENS
    else:
        assert stream > PROMPT_TOKENS
        assert recomputed == FIRST_CHUNK + stream - bounded_tail_start(stream)
    assert_close(prompt_logprobs(got), oracle_logprobs[:PROMPT_TOKENS - 1],
                 f"prompt logprobs, preempted {when}")
    check_continued_decode(got, uninterrupted, oracle_logprobs, f"preempted {when}")
    assert pool.get_num_free_blocks() == free_before, "pages leaked"


def test_a_stream_resent_with_its_output_continues_exactly(llm, prompt, uninterrupted,
                                                           oracle_logprobs):
    """A client rebuilding the stream resends its token ids, prompt and generated output,
    as one prompt: receptive-field prefill computes its first chunk and last R tokens, and
    the continuation is the uninterrupted request's."""
    generated = list(uninterrupted.outputs[0].token_ids)
    kept = 40
    before = counters(llm)
    out, = llm.generate([{"prompt_token_ids": prompt + generated[:kept]}],
                        SamplingParams(max_tokens=OUTPUT_TOKENS - kept, temperature=0,
                                       logprobs=0, ignore_eos=True), use_tqdm=False)
    resent = PROMPT_TOKENS + kept
    skipped = counters(llm)["prompt_tokens_skipped"] - before["prompt_tokens_skipped"]
    assert skipped == bounded_tail_start(resent) - FIRST_CHUNK > 0
    assert list(out.outputs[0].token_ids) == generated[kept:]
    assert_close(sampled_logprobs(out), sampled_logprobs(uninterrupted)[kept:],
                 "resent stream vs uninterrupted")
    assert_close(sampled_logprobs(out), oracle_logprobs[resent - 1:],
                 "resent stream vs the float64 oracle", offset=resent - 1)
