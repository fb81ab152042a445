"""The stream-state store's bookkeeping (lminf_vllm/sessions.py), without an engine:
admission of session requests and their refusals, exact prefix matching for transparent
continuation, LRU eviction, the cap, the idle timeout, and that every state's pages are
freed exactly once."""

from array import array
from types import SimpleNamespace

import pytest
from vllm.exceptions import VLLMValidationError

from lminf_vllm import sessions
from lminf_vllm.sessions import SessionRefused, SessionRequest, StreamState, StreamStore

PAGE = 4
SETTINGS = (8, 16)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_store(max_states=4, timeout=100.0, continuation=True):
    freed = []
    clock = Clock()
    store = StreamStore(page_size=PAGE, max_states=max_states, idle_timeout_s=timeout,
                        continuation=continuation, free_pages=freed.append,
                        settings_of=lambda args: SETTINGS, clock=clock)
    return store, freed, clock


def state(tokens, session_id=None, computed=None, pages=3):
    computed = len(tokens) - 1 if computed is None else computed
    return StreamState(token_ids=array("i", tokens), num_computed=computed,
                       pages=(SimpleNamespace(num_pages=pages),), settings=SETTINGS,
                       session_id=session_id,
                       page_hash=sessions.page_hashes(tokens, PAGE, computed // PAGE)[-1],
                       last_used=0.0)


def test_page_hashes_chain_every_earlier_page():
    a = sessions.page_hashes([1, 2, 3, 4, 5, 6, 7, 8], PAGE, 2)
    b = sessions.page_hashes([1, 2, 3, 9, 5, 6, 7, 8], PAGE, 2)
    assert len(a) == 3 and a[0] == b[0]
    assert a[1] != b[1] and a[2] != b[2], "a change in page 0 must change every later hash"


def test_continuation_takes_the_longest_exact_prefix_and_nothing_on_a_mismatch():
    store, freed, _ = make_store()
    short, long = state(list(range(10))), state(list(range(14)))
    store.keep(short, None)
    store.keep(long, None)
    prompt = list(range(20))
    assert store.continuation_for("r1", prompt, SETTINGS) is long
    store.release("r1")
    changed = list(range(20))
    changed[11] = 99  # inside long's stream, past short's
    assert store.continuation_for("r2", changed, SETTINGS) is short
    store.release("r2")
    changed[2] = 99
    assert store.continuation_for("r3", changed, SETTINGS) is None
    assert store.continuation_for("r4", list(range(13)), SETTINGS) is short, (
        "a state must leave at least one prompt token to compute")
    store.release("r4")
    assert store.continuation_for("r5", prompt, (0, 16)) is None, "other settings"
    off, _, _ = make_store(continuation=False)
    off.keep(state(list(range(10))), None)
    assert off.continuation_for("r6", prompt, SETTINGS) is None
    assert freed == []


def test_session_admission_and_refusals():
    store, freed, _ = make_store()
    with pytest.raises(SessionRefused, match="'s' is unknown.*resend the full stream") as e:
        store.session("r0", SessionRequest("s", new=False, close=False), SETTINGS)
    assert e.value.status == 404
    assert store.session("r1", SessionRequest("s", new=True, close=False), SETTINGS) is None
    with pytest.raises(SessionRefused, match="'s' is busy with request r1") as e:
        store.session("r2", SessionRequest("s", new=False, close=False), SETTINGS)
    assert e.value.status == 409
    first = state(list(range(9)), session_id="s")
    store.release("r1")
    store.keep(first, None)
    assert store.counters.sessions_held == 1
    with pytest.raises(SessionRefused, match=r"\(8, 16\).*\(0, 16\)") as e:
        store.session("r3", SessionRequest("s", new=False, close=False), (0, 16))
    assert e.value.status == 400
    assert store.session("r4", SessionRequest("s", new=False, close=False),
                         SETTINGS) is first
    # an aborted continuation: released, nothing kept, the state unchanged
    store.release("r4")
    assert store._by_session["s"] is first and freed == []
    # a normal one replaces the state and frees the old one
    assert store.session("r5", SessionRequest("s", new=False, close=False),
                         SETTINGS) is first
    second = state(list(range(15)), session_id="s")
    store.keep(second, replaces=store.release("r5"))
    assert store._by_session["s"] is second and freed == [first]
    store.close("s")
    assert freed == [first, second] and store.counters.sessions_held == 0
    with pytest.raises(SessionRefused, match="'s' is closed"):
        store.session("r6", SessionRequest("s", new=False, close=False), SETTINGS)
    assert store.counters.stream_states_held == 0 and store.counters.stream_state_pages == 0


def test_eviction_is_lru_spares_states_in_use_and_honours_cap_and_timeout():
    store, freed, clock = make_store(max_states=3, timeout=100.0)
    states = [state(list(range(i, i + 9)), session_id=f"s{i}") for i in range(3)]
    for s in states:
        clock.now += 1
        store.keep(s, None)
    # s0 used most recently, s1 in use by a running request
    assert store.session("a", SessionRequest("s0", False, False), SETTINGS) is states[0]
    store.release("a")
    assert store.session("b", SessionRequest("s1", False, False), SETTINGS) is states[1]
    assert store.evict_one("test") and freed == [states[2]]
    with pytest.raises(SessionRefused, match="'s2' is evicted \\(test\\)"):
        store.session("c", SessionRequest("s2", False, False), SETTINGS)
    assert store.counters.sessions_evicted == 1
    store.keep(state([7] * 9, session_id="n1"), None)
    store.keep(state([8] * 9, session_id="n2"), None)  # a fourth: over the cap of three
    assert freed[-1] is states[0], "the cap evicts the least recently used"
    clock.now += 1000
    store.expire_idle()
    # everything idle is gone except the state a request still copies
    assert list(store._by_session) == ["s1"]
    store.release("b")
    store.expire_idle()
    assert len(store) == 1, "idle time runs from the last use"
    clock.now += 101
    store.expire_idle()
    assert len(store) == 0 and len(freed) == 5 and len({id(s) for s in freed}) == 5
    assert store.counters.stream_state_pages == 0


@pytest.mark.parametrize("extra_args, field", [
    ({"lminf_session": 5}, "lminf_session"),
    ({"lminf_session": "x", "lminf_session_close": "no"}, "lminf_session_close"),
    ({"lminf_session_new": True}, "lminf_session_new"),
])
def test_malformed_session_keys_name_the_key(extra_args, field):
    with pytest.raises(VLLMValidationError, match=field):
        sessions.session_request(extra_args)


def test_json_booleans_from_vllm_xargs_are_accepted():
    assert sessions.session_request({"lminf_session": "x", "lminf_session_new": 1,
                                     "lminf_session_close": 0}) == SessionRequest("x", True,
                                                                                  False)


def test_a_refusal_travels_as_a_stop_reason():
    refusal = SessionRefused("lminf: session 'x' is busy with request r: one at a time", 409)
    assert sessions.parse_refusal(refusal.stop_reason()) == (str(refusal), 409)
    assert sessions.parse_refusal("stop") is None and sessions.parse_refusal(7) is None
