"""Streams that outlive a request (lminf_vllm/sessions.py) in a real engine.

* A stream split over k requests of one session (each sends only its new tokens) and the
  same stream resent whole turn by turn by a chat-style client (transparent continuation)
  each give the sampled logprobs of one uninterrupted request with the whole stream as its
  prompt, and of the float64 oracle.
* Refusals: an unknown, closed or evicted session, a busy one and one continued with other
  settings each finish with reason "error" and a message naming the session; nothing of the
  session changes. An aborted continuation leaves its session exactly as it was.
* Soak: many sessions in a pool that holds a few of them, random closes, aborts and
  evictions; every page comes back (vLLM's own block pool free count, exactly).

One in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, to read the scheduler and the
block pool), tiny model (L = 256, B = 16), n_global = 64, n_local = 256, so a state is
G + R = 4 + 33 = 37 pages; the pool holds POOL_BLOCKS.
"""


import numpy as np
import pytest
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from conftest import MODEL_DIR
from engine_checks import (LMINF_ORACLE_KWARGS, assert_close, engine_core_in_process,
                           sampled_logprobs)
from lminf_vllm import sessions
from oracle import Float64Llama

POOL_BLOCKS = 400  # ten states of 37 pages, fewer with requests running
PAGES_PER_STATE = 37
OUTPUT_TOKENS = 4


@pytest.fixture(scope="module")
def llm():
    with engine_core_in_process():
        engine = LLM(str(MODEL_DIR), attention_backend="lminf", dtype="float32",
                     max_model_len=1_000_000, max_num_seqs=4, block_size=16,
                     gpu_memory_utilization=0.3, enforce_eager=True, seed=0,
                     num_gpu_blocks_override=POOL_BLOCKS,
                     additional_config={"lminf": {"n_global": 64, "n_local": 256,
                                                  "continuation": True,
                                                  "stream_states": 8}})
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def oracle_model():
    return Float64Llama(MODEL_DIR)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def store_of(llm):
    return sessions.store_of(scheduler_of(llm).kv_cache_manager)


def pool_of(llm):
    return scheduler_of(llm).kv_cache_manager.block_pool


def drop_every_state(llm) -> None:
    store = store_of(llm)
    while store is not None and store.evict_one("test cleanup"):
        pass


def greedy(max_tokens=OUTPUT_TOKENS, **extra_args):
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True,
                          extra_args=extra_args or None)


def run(llm, prompt, params):
    out, = llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)
    return out


# Turn lengths: not page-aligned, the ring wraps inside the first, the stream passes 8L
# and the uninterrupted request's receptive-field prefill skips part of its prompt.
TURNS = (700, 333, 1001, 517)


def test_a_session_split_over_requests_is_one_request(llm, oracle_model, val_tokens):
    drop_every_state(llm)
    sid = "split"
    text = val_tokens[60_000:].tolist()
    stream, start, turn_outputs = [], 0, []
    for turn, length in enumerate(TURNS):
        new = text[start:start + length]
        start += length
        args = {sessions.SESSION: sid}
        if turn == 0:
            args[sessions.SESSION_NEW] = True
        out = run(llm, new, greedy(**args))
        assert out.outputs[0].finish_reason == "length", out.outputs[0]
        # the API side keeps the prompt the client sent: only the new tokens
        assert list(out.prompt_token_ids) == new
        turn_outputs.append(out)
        stream += new + list(out.outputs[0].token_ids)
    store = store_of(llm)
    kept = store._by_session[sid]
    assert list(kept.token_ids) == stream and kept.num_computed == len(stream) - 1
    assert kept.num_pages == PAGES_PER_STATE

    last = turn_outputs[-1]
    prompt = stream[:-OUTPUT_TOKENS]
    # one uninterrupted request (prompt logprobs: it reads no kept state)
    whole = run(llm, prompt, SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0,
                                            logprobs=0, ignore_eos=True, prompt_logprobs=0))
    assert list(whole.outputs[0].token_ids) == list(last.outputs[0].token_ids)
    error = assert_close(sampled_logprobs(last), sampled_logprobs(whole),
                         f"session of {len(TURNS)} requests vs one request")
    expected = oracle_model.prompt_logprobs(stream, **LMINF_ORACLE_KWARGS)
    position = 0
    for turn, out in zip(range(len(TURNS)), turn_outputs):
        position += TURNS[turn] + OUTPUT_TOKENS
        assert_close(sampled_logprobs(out),
                     expected[position - OUTPUT_TOKENS - 1:position - 1],
                     f"session turn {turn} vs the oracle", offset=position - OUTPUT_TOKENS - 1)
    print(f"session of {len(TURNS)} requests ({len(stream)} tokens): max |Δ logprob| vs one "
          f"request {error:.2e}; every turn within the tolerance of the oracle")


def test_a_chat_client_resending_the_history_continues_the_state(llm, oracle_model,
                                                                 val_tokens):
    drop_every_state(llm)
    text = val_tokens[90_000:].tolist()
    run(llm, text[:1], greedy(max_tokens=1))  # the engine builds its store on first use
    store = store_of(llm)
    drop_every_state(llm)
    history, start, outs = [], 0, []
    adopted_before = store.counters.stream_tokens_adopted
    adopted = 0
    for turn, length in enumerate(TURNS):
        history = history + text[start:start + length]
        start += length
        out = run(llm, history, greedy())
        if turn:
            # the previous turn's stream: its prompt, its output but the last token fed
            adopted += len(history) - length - 1
        outs.append(out)
        history = history + list(out.outputs[0].token_ids)
    assert store.counters.stream_tokens_adopted - adopted_before == adopted, (
        "every turn after the first continues the previous turn's state")
    whole = run(llm, history[:-OUTPUT_TOKENS],
                SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, logprobs=0,
                               ignore_eos=True, prompt_logprobs=0))
    assert list(whole.outputs[0].token_ids) == list(outs[-1].outputs[0].token_ids)
    error = assert_close(sampled_logprobs(outs[-1]), sampled_logprobs(whole),
                         "chat resend vs one request")
    expected = oracle_model.prompt_logprobs(history, **LMINF_ORACLE_KWARGS)
    end = len(history)
    assert_close(sampled_logprobs(outs[-1]), expected[end - OUTPUT_TOKENS - 1:end - 1],
                 "chat resend vs the oracle", offset=end - OUTPUT_TOKENS - 1)
    # a prompt that differs anywhere in the kept stream adopts nothing
    changed = list(history)
    changed[5] = (changed[5] + 1) % 1000
    before = store.counters.stream_tokens_adopted
    run(llm, changed + [7], greedy(max_tokens=1))
    assert store.counters.stream_tokens_adopted == before, "a mismatched prompt reused state"
    print(f"chat client resending {len(TURNS)} turns ({len(history)} tokens): {adopted} "
          f"tokens not recomputed, max |Δ logprob| vs one request {error:.2e}")


def refusal(out) -> str:
    completion = out.outputs[0]
    assert completion.finish_reason == "error", completion
    assert not completion.token_ids
    return str(completion.stop_reason)


def test_refused_session_requests_name_the_session(llm, val_tokens):
    drop_every_state(llm)
    text = val_tokens[120_000:].tolist()
    message = refusal(run(llm, text[:50], greedy(lminf_session="never-started")))
    assert "'never-started'" in message and "unknown" in message
    assert "resend the full stream" in message and "HTTP 404" in message

    run(llm, text[:300], greedy(lminf_session="s", lminf_session_new=True))
    kept = store_of(llm)._by_session["s"]
    snapshot = (list(kept.token_ids), kept.num_computed, [
        [b.block_id for b in group.blocks] for group in kept.pages])
    message = refusal(run(llm, text[300:310], greedy(lminf_session="s", lminf_n_local=128)))
    assert "'s'" in message and "HTTP 400" in message and "(64, 256)" in message

    # two requests on one session in one batch: the second is refused, never interleaved
    engine = llm.llm_engine
    engine.add_request("first", {"prompt_token_ids": text[300:400]},
                       greedy(max_tokens=2, lminf_session="s"))
    engine.add_request("second", {"prompt_token_ids": text[400:410]},
                       greedy(lminf_session="s"))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "busy" in refusal(finished["second"]) and "HTTP 409" in refusal(finished["second"])
    assert finished["first"].outputs[0].finish_reason == "length"
    kept = store_of(llm)._by_session["s"]
    # 300 + its 4 tokens, then 100 + 2, the last never fed
    assert kept.num_computed == 300 + OUTPUT_TOKENS + 100 + 2 - 1
    snapshot = (list(kept.token_ids), kept.num_computed, [
        [b.block_id for b in group.blocks] for group in kept.pages])

    # an aborted continuation leaves the session as it was
    engine.add_request("aborted", {"prompt_token_ids": text[500:900]},
                       greedy(max_tokens=50, lminf_session="s"))
    for _ in range(3):
        engine.step()
    engine.abort_request(["aborted"])
    while engine.has_unfinished_requests():
        engine.step()
    kept = store_of(llm)._by_session["s"]
    assert (list(kept.token_ids), kept.num_computed, [
        [b.block_id for b in group.blocks] for group in kept.pages]) == snapshot

    # close, then the closed session is refused
    run(llm, text[900:910], greedy(lminf_session="s", lminf_session_close=True))
    assert "s" not in store_of(llm)._by_session
    message = refusal(run(llm, text[910:920], greedy(lminf_session="s")))
    assert "'s' is closed" in message and "lminf_session_new" in message


@pytest.mark.parametrize("params, field", [
    (dict(n=2, extra_args={"lminf_session": "x"}), "n"),
    (dict(stop=["the"], extra_args={"lminf_session": "x"}), "stop"),
    (dict(prompt_logprobs=0, extra_args={"lminf_session": "x"}), "prompt_logprobs"),
    (dict(extra_args={"lminf_session": ""}), "lminf_session"),
    (dict(extra_args={"lminf_session": "x", "lminf_session_new": "yes"}), "lminf_session_new"),
    (dict(extra_args={"lminf_session_close": True}), "lminf_session_close"),
])
def test_malformed_session_requests_are_refused_at_admission(llm, params, field):
    with pytest.raises(VLLMValidationError, match=field):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1, **params),
                     use_tqdm=False)


def test_soak_every_page_comes_back(llm, val_tokens):
    """More sessions than the pool holds, random turn lengths, closes, aborts; evicted
    sessions are refused and restarted with their full stream, as a client would."""
    run(llm, [1, 2], greedy(max_tokens=1))  # the engine builds its store on first use
    drop_every_state(llm)
    pool, store, engine = pool_of(llm), store_of(llm), llm.llm_engine
    free_at_start = pool.get_num_free_blocks()
    evicted_before = store.counters.stream_states_evicted
    rng = np.random.default_rng(0)
    text = val_tokens[130_000:].tolist()
    streams: dict[str, list[int]] = {}
    cursor, refused, aborted = 0, 0, 0
    for step in range(60):
        sid = f"soak-{rng.integers(0, 24)}"
        length = int(rng.integers(1, 200))
        new, cursor = text[cursor:cursor + length], cursor + length
        args = {sessions.SESSION: sid}
        if sid not in streams:
            args[sessions.SESSION_NEW] = True
        close = rng.random() < 0.15
        if close:
            args[sessions.SESSION_CLOSE] = True
        abort = rng.random() < 0.15
        rid = f"soak-req-{step}"
        engine.add_request(rid, {"prompt_token_ids": new},
                           greedy(max_tokens=int(rng.integers(1, 6)), **args))
        outs, steps = [], 0
        while engine.has_unfinished_requests():
            if abort and steps == 1:
                engine.abort_request([rid])
            outs += [o for o in engine.step() if o.finished]
            steps += 1
        out = outs[-1] if outs else None
        completion = out.outputs[0] if out is not None else None
        if completion is not None and completion.finish_reason == "error":
            refused += 1
            assert "resend the full stream" in str(completion.stop_reason)
            streams.pop(sid, None)  # the client restarts it next time
        elif completion is not None and completion.finish_reason == "length":
            streams[sid] = streams.get(sid, []) + new + list(completion.token_ids)
            if close:
                streams.pop(sid)
        else:
            aborted += 1
            if sessions.SESSION_NEW in args:
                streams.pop(sid, None)
        held = sum(len(blocks) for m in scheduler_of(llm).kv_cache_manager.coordinator
                   .single_type_managers for blocks in m.req_to_blocks.values())
        assert held == 0, "a finished request still holds blocks"
        assert pool.get_num_free_blocks() + store.counters.stream_state_pages == free_at_start
        for sid_kept, state in store._by_session.items():
            if sid_kept in streams:
                assert list(state.token_ids) == streams[sid_kept], sid_kept
    evicted = store.counters.stream_states_evicted - evicted_before
    assert evicted > 0 and refused > 0 and aborted > 0, (evicted, refused, aborted)
    drop_every_state(llm)
    assert pool.get_num_free_blocks() == free_at_start
    assert store.counters.stream_state_pages == 0 and store.counters.sessions_held == 0
    print(f"soak: 60 requests on 24 sessions, {evicted} states evicted, {refused} refused, "
          f"{aborted} aborted; pool free count restored to {free_at_start}")
