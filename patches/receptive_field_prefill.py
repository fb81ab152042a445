"""Receptive-field prefill, the scheduler's half: jump a long prompt over its middle.

A prompt whose request asks for no prompt logprobs needs only its global prefix and its
last n_layers · (n_local - 1) + 1 tokens computed (docs/design.md, "The receptive field";
`receptive_field.request_tail_start` gives the page-aligned tail start b). vLLM's scheduler
computes a prompt from num_computed_tokens on, so the skip is one jump of that counter:

* Scheduler._update_after_schedule advances each scheduled request's num_computed_tokens
  by the tokens it was just given. Afterwards, a request still in its prompt whose counter
  is in [n_global, b) (its first chunk has covered the global prefix) has it set to b: its
  next chunk starts at b, at b's true position, and the tokens in between are never
  scheduled, written or read. The runner takes num_computed_tokens from the scheduler each
  step, so positions and token ids (which stay where vLLM keeps them: penalties and stop
  strings still see the whole prompt) follow; the KV manager claims the same G + R pages.
* The metadata builder (backend.py) plans tail queries to see no page below b, so the
  skipped slots are absent, not stale.

The tokens skipped are counted (`lminf:prompt_tokens_skipped`) and logged per request.
Off (no jump) when lminf.receptive_field_prefill is false, on model runner v2, and for
hybrid or attention-free models (`config.receptive_field_layers`).
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "receptive_field_prefill"
TARGET = "vllm.v1.core.sched.scheduler:Scheduler._update_after_schedule"
CONFIG_ATTR = "_lminf_receptive_field_config"


def engine_config(scheduler, logger):
    """The LMInfConfig of a scheduler whose engine skips, else None; decided once."""
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
                        "- 1) + 1, from a page boundary); set additional_config "
                        "lminf.receptive_field_prefill=false to compute every token",
                        config.n_global, receptive_field_tokens(
                            config.receptive_field_layers, config.n_local),
                        config.receptive_field_layers)
        else:
            logger.info("lminf: receptive-field prefill off (lminf.receptive_field_prefill "
                        "false, model runner v2, or a model that mixes positions outside "
                        "attention): every prompt token is computed")
            config = None
    setattr(scheduler, CONFIG_ATTR, config)
    return config


def needs_every_output(request) -> bool:
    """Whether a request reads the output of every prompt token: prompt logprobs do, and a
    pooling request (no sampling params) may. Takes the scheduler's Request or the
    runner's CachedRequestState, so both sides decide alike."""
    params = request.sampling_params
    return params is None or params.prompt_logprobs is not None


def jump_over_middle(request, config) -> int:
    """Set a request's num_computed_tokens to its tail start if it is due; the tokens
    skipped (0 when not due)."""
    from lminf_vllm.receptive_field import request_tail_start

    computed = request.num_computed_tokens
    if not config.n_global <= computed < request.num_prompt_tokens:
        return 0
    start = request_tail_start(config, request.num_prompt_tokens, needs_every_output(request))
    if computed >= start:
        return 0
    request.num_computed_tokens = start
    return start - computed


def _install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from lminf_vllm.kv_cache import LMInfManager
    from lminf_vllm.log import get_logger

    logger = get_logger(__name__)
    update_after_schedule = Scheduler._update_after_schedule

    def update_and_jump(self, scheduler_output, *args, **kwargs):
        update_after_schedule(self, scheduler_output, *args, **kwargs)
        config = engine_config(self, logger)
        if config is None:
            return
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests[req_id]
            skipped = jump_over_middle(request, config)
            if skipped:
                for manager in self.kv_cache_manager.coordinator.single_type_managers:
                    if isinstance(manager, LMInfManager):
                        manager.on_prompt_skipped(req_id, request.num_computed_tokens
                                                  - skipped, request.num_computed_tokens)
                logger.info("lminf: request %s: receptive-field prefill skips prompt "
                            "positions %d..%d (%d of %d tokens)", req_id,
                            request.num_computed_tokens - skipped,
                            request.num_computed_tokens - 1, skipped,
                            request.num_prompt_tokens)

    Scheduler._update_after_schedule = mark_applied(update_and_jump, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("after Scheduler._update_after_schedule advances num_computed_tokens, a prompt "
          "with no prompt logprobs whose global prefix is computed jumps to its "
          "receptive-field tail start (the middle of the prompt is never computed)"),
    why=("the last prompt token's output and the state depend only on the global prefix "
         "and the last n_layers * (n_local - 1) + 1 tokens (docs/design.md); vLLM "
         "computes every prompt token from num_computed_tokens on"),
    upstream="none: skipping the middle of a prompt is exact only under the Λ mask",
    remove_when="vLLM lets an attention backend or KV cache spec declare prompt tokens "
                "that need no computation",
    fingerprints={
        CPU_0_32: {TARGET: "2b527eb8070d3cce"},
        CUDA_0_32: {TARGET: "2b527eb8070d3cce"},
        CUDA_0_33: {TARGET: "2b527eb8070d3cce"},
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
