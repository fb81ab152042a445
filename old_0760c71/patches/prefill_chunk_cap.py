"""Cap each LMINF request's prefill chunk so the ring always covers n_local plus the chunk.

Chunked prefill writes a chunk's keys into the ring before attending, so the R ring pages
must hold n_local + chunk tokens (DESIGN §3); R is sized from
LMInfConfig.max_prefill_chunk_tokens. vLLM caps per-request prefill chunks with
SchedulerConfig.long_prefill_token_threshold, but the scheduler drops that cap when only
one request is eligible ("nobody to starve") and raises it when the adaptive threshold is
on. This patch, only when LMINF is selected:

* Scheduler.__init__: sets long_prefill_token_threshold to the chunk cap, turns the
  adaptive threshold off, and turns off prefix caching (a ring page holds different
  tokens after every wrap, so a cached page would be wrong), logging each change;
* Scheduler.schedule: when at most one request is eligible, lowers the step's token
  budget to the chunk cap, which is the same cap for the lone request.

A KV connector (kv_transfer_config) is refused at the same point with the reason: it moves
pages by position, which a ring does not keep.
"""

from ._patch import Patch, carries_mark, mark_applied

NAME = "prefill_chunk_cap"
TARGET = "vllm.v1.core.sched.scheduler:Scheduler.schedule"
INIT = "vllm.v1.core.sched.scheduler:Scheduler.__init__"
CAP_ATTR = "_lminf_prefill_chunk_cap"


def configure_scheduler(vllm_config, logger) -> int | None:
    """Make the engine's scheduler and cache settings fit the ring; the chunk cap or None.

    Idempotent; does nothing (returns None) unless LMINF is selected.
    """
    import lminf_vllm
    from lminf_vllm import config as lminf_config

    if not lminf_vllm.is_selected(vllm_config):
        return None
    cap = lminf_config.from_vllm_config(vllm_config).max_prefill_chunk_tokens
    if vllm_config.kv_transfer_config is not None:
        raise lminf_config.LMInfConfigError(
            "lminf: KV connectors (kv_transfer_config) are not supported: they move pages "
            "by position, and a ring page holds a different part of the stream after "
            "every wrap; remove kv_transfer_config or use another attention backend")
    scheduler_config = vllm_config.scheduler_config
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        logger.info("lminf: prefix caching off: ring pages are overwritten as the stream "
                    "moves, so a cached page would not hold the tokens its hash names")
        cache_config.enable_prefix_caching = False
    if not scheduler_config.enable_chunked_prefill:
        logger.info("lminf: chunked prefill on: a prompt longer than the ring must be "
                    "prefilled in chunks of at most %d tokens", cap)
        scheduler_config.enable_chunked_prefill = True
    if scheduler_config.long_prefill_token_threshold_adaptive:
        logger.info("lminf: adaptive long-prefill threshold off: it could raise a chunk "
                    "past the %d tokens the ring holds beyond n_local", cap)
        scheduler_config.long_prefill_token_threshold_adaptive = False
    threshold = scheduler_config.long_prefill_token_threshold
    if threshold == 0 or threshold > cap:
        logger.info("lminf: per-request prefill chunk capped at %d tokens (ring = n_local "
                    "+ chunk; set additional_config lminf.max_prefill_chunk_tokens to "
                    "change it)", cap)
        scheduler_config.long_prefill_token_threshold = cap
    return scheduler_config.long_prefill_token_threshold


def _install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from lminf_vllm.log import get_logger

    logger = get_logger(__name__)
    init = Scheduler.__init__
    schedule = Scheduler.schedule

    def scheduler_init(self, *args, **kwargs):
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        cap = configure_scheduler(vllm_config, logger)
        init(self, *args, **kwargs)
        setattr(self, CAP_ATTR, cap)

    def schedule_capped(self, *args, **kwargs):
        cap = getattr(self, CAP_ATTR, None)
        num_running, num_waiting = self.get_request_counts()
        if cap is None or num_running + num_waiting > 1 or \
                self.max_num_scheduled_tokens <= cap:
            return schedule(self, *args, **kwargs)
        # Alone in the step, the request would get the whole budget: lower the budget.
        budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = cap
        try:
            return schedule(self, *args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = budget

    Scheduler.__init__ = scheduler_init
    Scheduler.schedule = mark_applied(schedule_capped, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("Scheduler.__init__ caps per-request prefill chunks at "
          "lminf.max_prefill_chunk_tokens (long_prefill_token_threshold, adaptive off) and "
          "turns prefix caching off; Scheduler.schedule applies the cap to a lone request"),
    why=("the ring holds n_local + one chunk; vLLM drops long_prefill_token_threshold when "
         "one request is eligible"),
    upstream="none: the lone-request exemption is right when KV grows with the request",
    remove_when="vLLM lets a KV cache spec bound the tokens a request may schedule per step",
    fingerprinted={TARGET: "da4f2cf2fc39c39e", INIT: "c026802456720b43"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
