"""Receptive-field prefill, the scheduler's half: jump a long stream over its middle.

A prompt whose request asks for no prompt logprobs needs only its global prefix and its
last n_layers · (n_local - 1) + 1 tokens computed (docs/design.md, "The receptive field";
`receptive_field.request_tail_start` gives the page-aligned tail start b). vLLM's scheduler
computes a prompt from num_computed_tokens on, so the skip is one jump of that counter:

* Scheduler._update_after_schedule advances each scheduled request's num_computed_tokens
  by the tokens it was just given. Afterwards, a request whose counter is in [n_global, b)
  (its first chunk has covered the global prefix) has it set to b: its next chunk starts
  at b, at b's true position, and the tokens in between are never scheduled, written or
  read. The runner takes num_computed_tokens from the scheduler each step, so positions
  and token ids (which stay where vLLM keeps them: penalties and stop strings still see
  the whole prompt) follow; the KV manager claims the same G + R pages.
* The metadata builder (backend.py) plans tail queries to see no page below b, so the
  skipped slots are absent, not stale.

One mechanism covers bounded recovery after preemption. vLLM's _preempt_request frees a
request's pages and sets num_computed_tokens = 0; the resumed request then computes its
whole stream, prompt and output so far (request.num_tokens), and samples its next token
from the last one. That stream is a prompt like any other, so b is taken over all of it:
the recovery recomputes the global prefix (its first chunk) and the last R tokens, not
the stream. A request with prompt logprobs has them once it has output (they come out in
the step that samples its first token), so it skips on resume too; preempted before that,
it recomputes every token, as vLLM does.

Counted and logged: `lminf:prompt_tokens_skipped` for a first prefill; for a request
resumed after preemption, `lminf:recompute_tokens` (every token its replay computes) and
`lminf:recompute_tokens_skipped`, and one log line per replay. Off (no jump, full replay)
when lminf.receptive_field_prefill is false, on model runner v2, and for hybrid or
attention-free models (`config.receptive_field_layers`).
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "receptive_field_prefill"
TARGET = "vllm.v1.core.sched.scheduler:Scheduler._update_after_schedule"
# read, not patched: a preempted request restarts at num_computed_tokens = 0 with its
# output kept (the stream the jump is computed over)
PREEMPT = "vllm.v1.core.sched.scheduler:Scheduler._preempt_request"
CONFIG_ATTR = "_lminf_receptive_field_config"


def engine_config(scheduler, logger):
    """The LMInfConfig of a scheduler whose engine is lminf's, else None; decided once.
    With receptive-field prefill off nothing jumps (request_tail_start is 0), but a
    preempted request's full replay is still counted."""
    if hasattr(scheduler, CONFIG_ATTR):
        return getattr(scheduler, CONFIG_ATTR)
    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm.receptive_field import receptive_field_tokens

    config = None
    if lminf_vllm.is_selected(scheduler.vllm_config):
        config = lminf_config.from_vllm_config(scheduler.vllm_config)
        if config.receptive_field_layers:
            logger.info("lminf: receptive-field prefill on: a prompt without prompt logprobs "
                        "computes its first %d tokens and its last %d (%d layers x (n_local "
                        "- 1) + 1, from a page boundary), and a request resumed after "
                        "preemption as much of its stream; set additional_config "
                        "lminf.receptive_field_prefill=false to compute every token",
                        config.n_global, receptive_field_tokens(
                            config.receptive_field_layers, config.n_local),
                        config.receptive_field_layers)
        else:
            logger.info("lminf: receptive-field prefill off (lminf.receptive_field_prefill "
                        "false, model runner v2, or a model that mixes positions outside "
                        "attention): every prompt token is computed, and a preempted "
                        "request recomputes its whole stream")
    setattr(scheduler, CONFIG_ATTR, config)
    return config


def needs_every_output(request) -> bool:
    """Whether a request reads the output of every token it computes: a pooling request
    (no sampling params) may, and one with prompt logprobs does until it has output (the
    runner returns them in the step that samples the first token). Takes the scheduler's
    Request or the runner's CachedRequestState, so both sides decide alike."""
    params = request.sampling_params
    if params is None:
        return True
    has_output = request.num_tokens > request.num_prompt_tokens
    return params.prompt_logprobs is not None and not has_output


def jump_over_middle(request, config) -> int:
    """Set a request's num_computed_tokens to its tail start if it is due; the tokens
    skipped (0 when not due). The stream is request.num_tokens: the prompt, or the prompt
    and output of a request resumed after preemption. In decode num_computed_tokens is
    past every tail start (b <= num_tokens - R), so nothing moves."""
    from lminf_vllm.receptive_field import request_tail_start

    computed = request.num_computed_tokens
    if computed < config.n_global:
        return 0
    start = request_tail_start(config, request.num_tokens, needs_every_output(request))
    if computed >= start:
        return 0
    request.num_computed_tokens = start
    return start - computed


def is_replaying(request) -> bool:
    """Whether a request scheduled this step is rebuilding its stream after a preemption,
    read before the step's update: its first chunk starts at 0 (preemption reset the
    counter; no decode step does), later ones follow a chunk that left it mid-prefill."""
    return request.num_preemptions > 0 and (request.num_computed_tokens == 0
                                            or request.is_prefill_chunk)


def _install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from lminf_vllm.kv_cache import lminf_managers
    from lminf_vllm.log import get_logger

    logger = get_logger(__name__)
    update_after_schedule = Scheduler._update_after_schedule

    def update_and_jump(self, scheduler_output, *args, **kwargs):
        config = engine_config(self, logger)
        replaying = {} if config is None else {
            req_id: self.requests[req_id].num_computed_tokens
            for req_id in scheduler_output.num_scheduled_tokens
            if is_replaying(self.requests[req_id])}
        update_after_schedule(self, scheduler_output, *args, **kwargs)
        if config is None:
            return
        managers = lminf_managers(self.kv_cache_manager)
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            resumed = req_id in replaying
            skipped = jump_over_middle(request, config)
            for manager in managers:
                if resumed:
                    manager.counters.recompute_tokens += num_scheduled
                if skipped:
                    manager.on_prompt_skipped(req_id, request.num_computed_tokens - skipped,
                                              request.num_computed_tokens, resumed=resumed)
            if skipped and resumed:
                logger.info("lminf: request %s resumes after preemption: skips stream "
                            "positions %d..%d and recomputes %d of its %d tokens", req_id,
                            request.num_computed_tokens - skipped,
                            request.num_computed_tokens - 1, request.num_tokens - skipped,
                            request.num_tokens)
            elif skipped:
                logger.info("lminf: request %s: receptive-field prefill skips prompt "
                            "positions %d..%d (%d of %d tokens)", req_id,
                            request.num_computed_tokens - skipped,
                            request.num_computed_tokens - 1, skipped,
                            request.num_prompt_tokens)
            elif resumed and replaying[req_id] == 0 and request.num_computed_tokens >= \
                    config.n_global:
                logger.info("lminf: request %s resumes after preemption: recomputes all "
                            "%d tokens of its stream (nothing to skip)", req_id,
                            request.num_tokens)

    Scheduler._update_after_schedule = mark_applied(update_and_jump, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("after Scheduler._update_after_schedule advances num_computed_tokens, a prompt "
          "with no prompt logprobs, or the stream of a request resumed after preemption, "
          "whose global prefix is computed jumps to its receptive-field tail start (the "
          "middle is never computed); the recovery's recomputed and skipped tokens are "
          "counted"),
    why=("the last prompt token's output and the state depend only on the global prefix "
         "and the last n_layers * (n_local - 1) + 1 tokens (docs/design.md); vLLM "
         "computes every prompt token from num_computed_tokens on"),
    upstream="none: skipping the middle of a prompt is exact only under the Λ mask",
    remove_when="vLLM lets an attention backend or KV cache spec declare prompt tokens "
                "that need no computation",
    fingerprints={
        CPU_0_32: {TARGET: "2b527eb8070d3cce", PREEMPT: "4113f5de8a84ec25"},
        CUDA_0_32: {TARGET: "2b527eb8070d3cce", PREEMPT: "4113f5de8a84ec25"},
        CUDA_0_33: {TARGET: "2b527eb8070d3cce", PREEMPT: "8d67cc4e85688724"},
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
