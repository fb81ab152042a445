"""Stream states that outlive a request: sessions and transparent continuation.

After T tokens the whole state of an lminf stream is its G pinned pages plus its ring of R
pages (docs/design.md, "A stream's state"): constant size, whatever T is. So a finished
request's state can be kept in vLLM's block pool and a later request that continues the
same stream can start from it at num_computed_tokens = T, like a prefix-cache hit: its
positions continue at T, its keys are already in the page-local frame.

Two ways to name the stream a request continues (both through vLLM's per-request channel,
SamplingParams.extra_args / `vllm_xargs`):

* a session: `lminf_session: "<id>"`. The first request carries `lminf_session_new: true`
  and its prompt is the whole stream; each next request sends only its new tokens, which the
  engine appends to the session's token ids (kept in host memory, 4 B per token, so
  penalties and vLLM's token bookkeeping still see one stream). `lminf_session_close: true`
  frees the session's pages when that request finishes.
* transparent continuation (engine setting `lminf.continuation`): any request whose prompt
  begins with the exact token stream of a kept state (a finished request's, or a
  session's) adopts it. Candidates are found by a chained hash of the stream's full pages
  (as vLLM's prefix cache keys blocks) and then compared token by token: a mismatch
  anywhere means no reuse.

A request never writes into a kept state: it adopts a copy of the G + R pages (vLLM's
copy-on-write channel, SchedulerOutput.kv_cache_block_copies, copies them on the worker
before the step's forward), so an aborted or failed request leaves the state exactly as it
was. When the request finishes normally its own pages become the new state and the old
one is freed.

This module is the bookkeeping only (no vLLM imports at module level): `StreamStore` holds
the states, finds them, counts them and picks what to evict (least recently used first,
at most `stream_states` of them, none idle longer than `stream_idle_timeout_s`; evicted
under memory pressure before any request is preempted). The KV manager hooks are in
kv_cache.py and the scheduler hooks in patches/stream_states.py.
"""

from __future__ import annotations

import re
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

SESSION = "lminf_session"
SESSION_NEW = "lminf_session_new"
SESSION_CLOSE = "lminf_session_close"
KEYS = (SESSION, SESSION_NEW, SESSION_CLOSE)
# Closed and evicted session ids remembered (oldest dropped first), so that a request
# naming one is told what happened to it.
TOMBSTONES = 4096


@dataclass(frozen=True)
class SessionRequest:
    """What a request asks of a session: its id, whether it starts it, whether it ends it."""

    session_id: str
    new: bool
    close: bool


def _error(message: str, parameter: str):
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def session_request(extra_args: Mapping[str, Any] | None) -> SessionRequest | None:
    """The session a request names, or None. Raises VLLMValidationError (HTTP 400) naming
    the key for a malformed value."""
    args = extra_args or {}
    if SESSION not in args:
        stray = [key for key in (SESSION_NEW, SESSION_CLOSE) if key in args]
        if stray:
            raise _error(f"lminf: {stray[0]} needs {SESSION} (the session's id)", stray[0])
        return None
    session_id = args[SESSION]
    if not isinstance(session_id, str) or not session_id:
        raise _error(f"lminf: {SESSION}={session_id!r} must be a non-empty string", SESSION)
    flags = {}
    for key in (SESSION_NEW, SESSION_CLOSE):
        value = args.get(key, False)
        # the OpenAI API's vllm_xargs (str | int | float values) turns JSON true into 1
        if type(value) not in (bool, int) or value not in (0, 1):
            raise _error(f"lminf: {key}={value!r} must be true or false", key)
        flags[key] = bool(value)
    return SessionRequest(session_id, flags[SESSION_NEW], flags[SESSION_CLOSE])


def validate_session_params(sampling_params) -> None:
    """The checks that need only the request (run at admission, HTTP 400): a session
    request must be one sequence (n = 1), end inside the engine (no stop strings: the API
    server applies them after the engine has run past them, so the engine's stream would
    hold tokens the client never saw) and, when it continues a session, ask for no prompt
    logprobs (its earlier tokens are not recomputed)."""
    request = session_request(sampling_params.extra_args)
    if request is None:
        return
    where = f"{SESSION}={request.session_id!r}"
    if sampling_params.n != 1:
        raise _error(f"lminf: {where}: n={sampling_params.n}; a session request must be "
                     f"one sequence (n=1)", "n")
    if sampling_params.stop:
        raise _error(f"lminf: {where}: stop strings end a request in the API server, after "
                     f"the engine's stream has run past them; use stop_token_ids", "stop")
    if not request.new and sampling_params.prompt_logprobs is not None:
        raise _error(f"lminf: {where}: prompt_logprobs on a session continuation (the "
                     f"session's earlier tokens are not recomputed); start a session with "
                     f"{SESSION_NEW}=true to get them", "prompt_logprobs")


class SessionRefused(Exception):
    """A session request the engine cannot serve. status: the HTTP status it stands for
    (404 unknown/closed/evicted, 409 busy, 400 settings differ); the message names the
    session and what to do."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def stop_reason(self) -> str:
        """How the refusal travels to the API server: the stop_reason of an output that
        finishes the request with reason "error" (patches/session_refusals.py reads it)."""
        return f"{self} [HTTP {self.status}]"


_REFUSAL = re.compile(r"(lminf: session .*) \[HTTP (\d{3})\]", re.S)


def parse_refusal(stop_reason: Any) -> tuple[str, int] | None:
    """(message, HTTP status) of a SessionRefused.stop_reason(), else None."""
    match = _REFUSAL.fullmatch(stop_reason) if isinstance(stop_reason, str) else None
    return (match.group(1), int(match.group(2))) if match else None


def page_hashes(tokens: Sequence[int], page_size: int, num_pages: int) -> list[int]:
    """Chained hashes of the first num_pages full pages: h[k] covers tokens[:k·B]
    (h[0] = hash of the empty stream)."""
    hashes = [hash(("lminf-stream", page_size))]
    for page in range(num_pages):
        chunk = tuple(tokens[page * page_size:(page + 1) * page_size])
        hashes.append(hash((hashes[-1], chunk)))
    return hashes


@dataclass(eq=False)
class StreamState:
    """One kept stream: token_ids (its tokens; the KV of the first num_computed is in the
    pages), the pages per KV cache group (opaque to this module) with each group's manager
    bookkeeping, the lminf settings it was computed with, and who uses it.

    session_id: its session, or None (a finished request's, for continuation).
    users: request ids that adopted a copy and are still running.
    """

    token_ids: array
    num_computed: int
    pages: tuple[Any, ...]
    settings: tuple[int, int]
    session_id: str | None
    page_hash: int
    last_used: float
    users: set[str] = field(default_factory=set)

    @property
    def num_pages(self) -> int:
        return sum(group.num_pages for group in self.pages)


@dataclass
class StoreCounters:
    """What the store reports (lminf_vllm/metrics.py turns them into series)."""

    stream_states_held: int = 0
    sessions_held: int = 0
    stream_state_pages: int = 0
    stream_states_evicted: int = 0
    sessions_evicted: int = 0
    stream_tokens_adopted: int = 0


class StreamStore:
    """The kept stream states of one engine (EngineCore process).

    free_pages: returns a state's pages to the block pool (the KV side).
    settings_of: a request's (n_global, n_local) from its extra_args.
    """

    def __init__(self, *, page_size: int, max_states: int, idle_timeout_s: float,
                 continuation: bool, free_pages: Callable[[StreamState], None],
                 settings_of: Callable[[Mapping[str, Any] | None], tuple[int, int]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.page_size = page_size
        self.settings_of = settings_of
        self.max_states = max_states
        self.idle_timeout_s = idle_timeout_s
        self.continuation = continuation
        self._free_pages = free_pages
        self._clock = clock
        self._lru: OrderedDict[int, StreamState] = OrderedDict()  # least recent first
        self._by_session: dict[str, StreamState] = {}
        self._by_hash: dict[int, list[StreamState]] = {}
        self._tombstones: OrderedDict[str, str] = OrderedDict()
        # request id -> the state it continues (from admission to its end)
        self.bound: dict[str, StreamState] = {}
        # session id -> the request now running on it
        self._busy: dict[str, str] = {}
        self.counters = StoreCounters()

    # ---- lookup ---------------------------------------------------------------------

    def session(self, request_id: str, request: SessionRequest,
                settings: tuple[int, int]) -> StreamState | None:
        """Admit a session request: the state it continues (None for a new session).
        Raises SessionRefused when the session is busy, unknown, closed, evicted or was
        computed with other settings."""
        sid = request.session_id
        self.expire_idle()
        if sid in self._busy:
            raise SessionRefused(
                f"lminf: session {sid!r} is busy with request {self._busy[sid]}: one "
                f"request at a time per session; send this one after it finishes", 409)
        state = self._by_session.get(sid)
        if request.new:
            # an old state of this id stays until the new stream finishes (keep), so an
            # aborted restart leaves the session as it was
            self._busy[sid] = request_id
            return None
        if state is None:
            what = self._tombstones.get(sid, "unknown to this engine")
            raise SessionRefused(
                f"lminf: session {sid!r} is {what}: resend the full stream (all its "
                f"tokens) with {SESSION_NEW}=true", 404)
        if state.settings != settings:
            raise SessionRefused(
                f"lminf: session {sid!r} was started with (n_global, n_local) = "
                f"{state.settings}; this request asks for {settings}: a session keeps its "
                f"settings (send the same lminf_n_global / lminf_n_local)", 400)
        self._busy[sid] = request_id
        self._bind(request_id, state)
        return state

    def continuation_for(self, request_id: str, prompt: Sequence[int],
                         settings: tuple[int, int]) -> StreamState | None:
        """The longest kept stream that this prompt begins with exactly (and leaves at
        least one token to compute), computed with the same settings; bound to the
        request. None when continuation is off or nothing matches."""
        if request_id in self.bound:
            return self.bound[request_id]
        if not self.continuation or not self._lru:
            return None
        self.expire_idle()
        # hash no further than the longest kept stream reaches (a prompt may be far longer)
        limit = len(prompt) - 1
        reach = min(limit, max(state.num_computed for state in self._lru.values()))
        hashes = page_hashes(prompt, self.page_size, reach // self.page_size)
        best = None
        for pages in range(len(hashes) - 1, -1, -1):
            for state in self._by_hash.get(hashes[pages], ()):
                if (state.num_computed <= limit and state.settings == settings
                        and (best is None or state.num_computed > best.num_computed)
                        and list(state.token_ids[:state.num_computed])
                        == list(prompt[:state.num_computed])):
                    best = state
            if best is not None:
                break
        if best is not None:
            self._bind(request_id, best)
        return best

    def _bind(self, request_id: str, state: StreamState) -> None:
        self.bound[request_id] = state
        state.users.add(request_id)
        self._touch(state)

    # ---- a request ends -------------------------------------------------------------

    def release(self, request_id: str) -> StreamState | None:
        """The request ended (finished, aborted or failed): it no longer uses its state,
        and its session is free again. Returns the state it continued, if any."""
        state = self.bound.pop(request_id, None)
        if state is not None:
            state.users.discard(request_id)
            self._touch(state)  # idle from now
        for sid, rid in list(self._busy.items()):
            if rid == request_id:
                del self._busy[sid]
        return state

    def keep(self, state: StreamState, replaces: StreamState | None) -> None:
        """A request finished normally: its state is kept (replacing the one it continued,
        when nobody else uses that one)."""
        if replaces is not None and not replaces.users and self.is_kept(replaces):
            self.drop(replaces, None)
        if state.session_id is not None:
            old = self._by_session.get(state.session_id)
            if old is not None:
                self.drop(old, None)
            self._by_session[state.session_id] = state
            self._tombstones.pop(state.session_id, None)
            self.counters.sessions_held += 1
        self._lru[id(state)] = state
        self._touch(state)
        self._by_hash.setdefault(state.page_hash, []).append(state)
        self.counters.stream_states_held += 1
        self.counters.stream_state_pages += state.num_pages
        while len(self._lru) > self.max_states and self.evict_one("the state cap "
                                                                  "(lminf.stream_states)"):
            pass

    def close(self, session_id: str) -> None:
        """Free a session's pages now (its request finished with lminf_session_close)."""
        state = self._by_session.get(session_id)
        if state is not None:
            self.drop(state, None)
        self._remember(session_id, "closed")

    # ---- eviction -------------------------------------------------------------------

    def evict_one(self, reason: str) -> bool:
        """Evict the least recently used state no running request is copying; False when
        there is none."""
        for state in self._lru.values():
            if not state.users:
                self._evict(state, reason)
                return True
        return False

    def expire_idle(self) -> None:
        """Evict the states idle longer than the idle timeout."""
        deadline = self._clock() - self.idle_timeout_s
        for state in list(self._lru.values()):  # least recently used first
            if state.last_used > deadline:
                return
            if state.users:
                continue
            self._evict(state, f"idle longer than lminf.stream_idle_timeout_s="
                               f"{self.idle_timeout_s:g}")

    def _evict(self, state: StreamState, reason: str) -> None:
        self.counters.stream_states_evicted += 1
        self.counters.sessions_evicted += int(state.session_id is not None)
        self.drop(state, f"evicted ({reason})")

    def drop(self, state: StreamState, tombstone: str | None) -> None:
        """Forget a state and free its pages (a no-op for one already dropped)."""
        if self._lru.pop(id(state), None) is None:
            return
        same_hash = self._by_hash.get(state.page_hash, [])
        same_hash.remove(state)
        if not same_hash:
            del self._by_hash[state.page_hash]
        if state.session_id is not None and self._by_session.get(state.session_id) is state:
            del self._by_session[state.session_id]
            self.counters.sessions_held -= 1
            if tombstone is not None:
                self._remember(state.session_id, tombstone)
        self.counters.stream_states_held -= 1
        self.counters.stream_state_pages -= state.num_pages
        self._free_pages(state)

    def _remember(self, session_id: str, what: str) -> None:
        self._tombstones[session_id] = what
        self._tombstones.move_to_end(session_id)
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _touch(self, state: StreamState) -> None:
        state.last_used = self._clock()
        if id(state) in self._lru:
            self._lru.move_to_end(id(state))

    def is_kept(self, state: StreamState) -> bool:
        return id(state) in self._lru

    def __len__(self) -> int:
        return len(self._lru)


# The store lives on the engine's KVCacheManager (one per scheduler), where the scheduler
# hooks (patches/stream_states.py) and the stats (patches/scheduler_stats_lminf.py) find it.
STORE_ATTR = "_lminf_stream_store"


def store_of(kv_cache_manager) -> StreamStore | None:
    """The engine's stream store, or None (not an lminf engine, or not yet built)."""
    return getattr(kv_cache_manager, STORE_ATTR, None)


def attach_store(kv_cache_manager, store: StreamStore) -> None:
    setattr(kv_cache_manager, STORE_ATTR, store)
