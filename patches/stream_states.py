"""Stream states that outlive a request, the scheduler's half (lminf_vllm/sessions.py).

vLLM's scheduler already has the path a kept state needs: a new request's prefix-cache hit
(KVCacheManager.get_computed_blocks returns blocks and a token count; allocate_slots hands
them to the KV manager and the request starts at num_computed_tokens = that count) and
a copy-on-write channel (the KV manager's pending copies become
SchedulerOutput.kv_cache_block_copies, which the worker runs before the step's forward).
lminf's KV manager never hashes blocks (prefix caching is off), so this patch wraps:

* Scheduler.add_request: a session request (lminf_session) is admitted by the engine's
  StreamStore: a continuation gets the session's token ids put before its new tokens (the
  engine then sees one stream: positions continue at T, penalties see every token). A
  refused one (busy, unknown, closed, evicted, other settings) never enters the scheduler;
  it is answered in the next output as finished with reason "error" and the store's
  message (naming the session and what to do) as its stop_reason.
* KVCacheManager.get_computed_blocks: a request bound to a kept state (its session's, or
  with lminf.continuation the longest kept stream its prompt starts with exactly) gets
  that state's blocks and T as its hit; LMInfManager.add_local_computed_blocks adopts
  copies of them.
* KVCacheManager.allocate_slots: when the pool is short, kept states no running request
  copies are evicted, least recently used first, before vLLM gives up (and so before it
  preempts a running request).
* Scheduler._free_request: a request that finished normally leaves its blocks to the
  store as the new state of its stream (unless lminf_session_close); an aborted or failed
  one frees its copies and leaves the state it continued untouched.
* Scheduler.update_from_output / has_requests: report the refused session requests.

Only for engines whose KV cache groups are all lminf (a hybrid model's other groups would
have no kept state); lminf.stream_states = 0 keeps nothing.
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "stream_states"
SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
ADD_REQUEST = f"{SCHEDULER}.add_request"
FREE_REQUEST = f"{SCHEDULER}._free_request"
UPDATE_FROM_OUTPUT = f"{SCHEDULER}.update_from_output"
HAS_REQUESTS = f"{SCHEDULER}.has_requests"
MANAGER = "vllm.v1.core.kv_cache_manager:KVCacheManager"
GET_COMPUTED_BLOCKS = f"{MANAGER}.get_computed_blocks"
ALLOCATE_SLOTS = f"{MANAGER}.allocate_slots"
TAKE_COPIES = f"{MANAGER}.take_kv_cache_block_copies"
COW_COPIES = "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.__init__"
# where the model runners (v1, v2) run SchedulerOutput.kv_cache_block_copies
RUNNER_V1_COPIES = "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states"
RUNNER_V2_COPIES = "vllm.v1.worker.gpu.model_runner:GPUModelRunner.update_requests"
TARGET = ADD_REQUEST
REFUSED_ATTR = "_lminf_refused_session_requests"
FINISHED_OK = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


def store_for(scheduler, logger):
    """The scheduler's StreamStore, built on first use; None for an engine that keeps no
    stream states."""
    from lminf_vllm import sessions
    from lminf_vllm.kv_cache import lminf_managers

    manager = scheduler.kv_cache_manager
    if hasattr(manager, sessions.STORE_ATTR):
        return sessions.store_of(manager)
    store = None
    import lminf_vllm

    groups = manager.coordinator.single_type_managers
    lminf = lminf_managers(manager)
    if lminf_vllm.is_selected(scheduler.vllm_config) and lminf and len(lminf) == len(groups):
        from lminf_vllm import config as lminf_config
        from lminf_vllm.request_settings import requested

        config = lminf_config.from_vllm_config(scheduler.vllm_config)
        if config.stream_states:
            def free_pages(state):
                for group_manager, pages in zip(lminf, state.pages):
                    group_manager.free_kept(pages)

            store = sessions.StreamStore(
                page_size=config.page_size, max_states=config.stream_states,
                idle_timeout_s=config.stream_idle_timeout_s,
                continuation=config.continuation, free_pages=free_pages,
                settings_of=lambda extra_args: requested(extra_args, config.n_global,
                                                         config.n_local))
            logger.info("lminf: stream states kept between requests: at most %d (G + R = "
                        "%d pages each), idle timeout %g s, transparent continuation %s",
                        config.stream_states, config.num_pinned_pages
                        + config.num_ring_pages, config.stream_idle_timeout_s,
                        "on" if config.continuation else "off (sessions only)")
    sessions.attach_store(manager, store)
    return store


def continue_session(request, state) -> None:
    """Put the session's tokens before the request's new ones (the engine's copy of the
    request only: the API server keeps the prompt the client sent)."""
    stored = list(state.token_ids)
    request.prompt_token_ids = stored + list(request.prompt_token_ids)
    request.num_prompt_tokens = len(request.prompt_token_ids)
    request._all_token_ids[:0] = stored  # all_token_ids is a view of this list


def _install() -> None:
    from array import array

    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    from lminf_vllm import sessions
    from lminf_vllm.kv_cache import lminf_managers
    from lminf_vllm.log import get_logger

    logger = get_logger(__name__)
    finished_ok = tuple(getattr(RequestStatus, name) for name in FINISHED_OK)
    add_request = Scheduler.add_request
    free_request = Scheduler._free_request
    update_from_output = Scheduler.update_from_output
    has_requests = Scheduler.has_requests
    get_computed_blocks = KVCacheManager.get_computed_blocks
    allocate_slots = KVCacheManager.allocate_slots

    def add_session_request(self, request, *args, **kwargs):
        store = store_for(self, logger)
        params = request.sampling_params
        asked = sessions.session_request(params.extra_args) if params is not None else None
        if store is not None and asked is not None:
            try:
                state = store.session(request.request_id, asked,
                                      store.settings_of(params.extra_args))
            except sessions.SessionRefused as refusal:
                logger.warning("lminf: request %s refused (HTTP %d): %s",
                               request.request_id, refusal.status, refusal)
                self.__dict__.setdefault(REFUSED_ATTR, []).append(
                    (request, refusal.stop_reason()))
                return None
            if state is not None:
                continue_session(request, state)
        return add_request(self, request, *args, **kwargs)

    def free_and_keep(self, request, *args, **kwargs):
        store = sessions.store_of(self.kv_cache_manager)
        if store is None:
            return free_request(self, request, *args, **kwargs)
        request_id = request.request_id
        continued = store.release(request_id)
        params = request.sampling_params
        asked = sessions.session_request(params.extra_args) if params is not None else None
        ok = request.status in finished_ok and request_id in self.requests
        keep = ok and ((asked is not None and not asked.close)
                       or (asked is None and store.continuation))
        state = None
        if keep:
            managers = lminf_managers(self.kv_cache_manager)
            pages = tuple(manager.detach(request_id) for manager in managers)
            tokens = array("i", request.all_token_ids)
            # the last sampled token is never fed (with async scheduling a step may have
            # fed it already: its KV is then rewritten by the continuation, identically)
            computed = min(request.num_computed_tokens, len(tokens) - 1)
            state = sessions.StreamState(
                token_ids=tokens, num_computed=computed, pages=pages,
                settings=store.settings_of(params.extra_args),
                session_id=asked.session_id if asked is not None else None,
                page_hash=(sessions.page_hashes(tokens, store.page_size,
                                                computed // store.page_size)[-1]
                           if store.continuation else 0),
                last_used=0.0)
        result = free_request(self, request, *args, **kwargs)
        if state is not None:
            store.keep(state, replaces=continued)
        elif ok and asked is not None and asked.close:
            store.close(asked.session_id)
        return result

    def report_refused(self, *args, **kwargs):
        outputs = update_from_output(self, *args, **kwargs)
        refused = self.__dict__.pop(REFUSED_ATTR, None)
        for request, message in refused or ():
            batch = outputs.get(request.client_index)
            if batch is None:
                batch = outputs[request.client_index] = EngineCoreOutputs()
            batch.outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[],
                finish_reason=FinishReason.ERROR, stop_reason=message))
            batch.finished_requests = set(batch.finished_requests or ()) | {
                request.request_id}
        return outputs

    def has_requests_or_refused(self, *args, **kwargs):
        return has_requests(self, *args, **kwargs) or bool(self.__dict__.get(REFUSED_ATTR))

    def computed_blocks_of_kept_state(self, request, *args, **kwargs):
        # 0.33 adds max_cache_hit_length (default: all but the last token)
        store = sessions.store_of(self)
        if store is None:
            return get_computed_blocks(self, request, *args, **kwargs)
        limit = (args[0] if args else kwargs.get("max_cache_hit_length")
                 ) or request.num_tokens - 1
        state = store.bound.get(request.request_id)
        if state is None and not request.skip_reading_prefix_cache:
            params = request.sampling_params
            state = store.continuation_for(
                request.request_id, request.all_token_ids,
                store.settings_of(params.extra_args if params is not None else None))
        if state is None or not store.is_kept(state) or state.num_computed > limit:
            return get_computed_blocks(self, request, *args, **kwargs)
        for manager, pages in zip(lminf_managers(self), state.pages):
            manager.expect_adoption(request.request_id, pages)
        store.counters.stream_tokens_adopted += state.num_computed
        logger.info("lminf: request %s continues a kept stream state of %d tokens%s",
                    request.request_id, state.num_computed,
                    f" (session {state.session_id!r})" if state.session_id else "")
        return (KVCacheBlocks(tuple(list(pages.blocks) for pages in state.pages)),
                state.num_computed, 0)

    def allocate_or_evict(self, request, *args, **kwargs):
        blocks = allocate_slots(self, request, *args, **kwargs)
        store = sessions.store_of(self)
        while blocks is None and store is not None and store.evict_one("memory pressure"):
            blocks = allocate_slots(self, request, *args, **kwargs)
        return blocks

    Scheduler.add_request = mark_applied(add_session_request, NAME)
    Scheduler._free_request = free_and_keep
    Scheduler.update_from_output = report_refused
    Scheduler.has_requests = has_requests_or_refused
    KVCacheManager.get_computed_blocks = computed_blocks_of_kept_state
    KVCacheManager.allocate_slots = allocate_or_evict


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("Scheduler.add_request admits session requests (prepends the session's tokens, "
          "or refuses with an error output); KVCacheManager.get_computed_blocks returns a "
          "kept stream state as the request's hit (copied by vLLM's CoW channel); "
          "allocate_slots evicts kept states before giving up; Scheduler._free_request "
          "keeps a normally finished request's blocks as its stream's new state"),
    why=("an lminf stream's whole state is G + R pages (docs/design.md), so a later request "
         "continuing the stream can start at T instead of re-prefilling; vLLM's prefix "
         "cache keys pages by content, which a recycled ring page does not have"),
    upstream="none: a constant-size stream state exists only under the Λ mask",
    remove_when="vLLM lets a KV manager keep a finished request's blocks and offer them "
                "as a hit",
    fingerprints={
        build: {ADD_REQUEST: "fa2b51cd04a90977", HAS_REQUESTS: "6529a9d59f78d9c0",
                ALLOCATE_SLOTS: "8c60d937fd9eb0c8", TAKE_COPIES: "807042512478e8f2",
                COW_COPIES: "bec95fffc42da98b", RUNNER_V1_COPIES: "326599f31b273b94",
                RUNNER_V2_COPIES: "7a208ede606f6fc1",
                FREE_REQUEST: free, UPDATE_FROM_OUTPUT: update, GET_COMPUTED_BLOCKS: hit}
        for build, (free, update, hit) in {
            CPU_0_32: ("1b386dca84e6bb73", "85b29db96051135c", "77f434d88d573bfe"),
            CUDA_0_32: ("1b386dca84e6bb73", "85b29db96051135c", "77f434d88d573bfe"),
            CUDA_0_33: ("a2e0937699dc54a6", "8067d98a98b620cb", "ae0e67c0720ab760"),
        }.items()},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
