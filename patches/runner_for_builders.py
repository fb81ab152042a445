"""Hand the v1 model runner to its engine's metadata builders (through the engine context).

An attention metadata builder sees each step's rows as query_start_loc, seq_lens and the
block table: nothing says which request a row is, how long its prompt is or what it asked
for. Receptive-field prefill needs that per row (a row's tail start depends on its prompt
length and on whether it asked for prompt logprobs: `receptive_field.request_tail_start`),
and the v1 runner has it (`input_batch.req_ids`, whose order is the rows' order, and
`requests`). This patch wraps GPUModelRunner.initialize_attn_backend, where the runner
creates the builders, to record a weak reference to the runner in the engine's context
(`engine_context.EngineContext.model_runner`) first; the builder reads the rows from it
at build time. Model runner v2 does not call this method, so there the reference stays
None and receptive-field prefill is off (`config.receptive_field_layers`).

Applied to every engine; it only stores a weak reference.
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "runner_for_builders"
TARGET = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.initialize_attn_backend"


def _install() -> None:
    import weakref

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lminf_vllm import engine_context

    initialize_attn_backend = GPUModelRunner.initialize_attn_backend

    def publish_then_initialize(self, *args, **kwargs):
        engine_context.of(self.vllm_config).model_runner = weakref.ref(self)
        return initialize_attn_backend(self, *args, **kwargs)

    GPUModelRunner.initialize_attn_backend = mark_applied(publish_then_initialize, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("GPUModelRunner.initialize_attn_backend first records a weak reference to the "
          "runner in the engine's lminf context, for the metadata builders it creates"),
    why=("the builder must know each row's prompt length and prompt-logprobs request "
         "(receptive-field prefill), which CommonAttentionMetadata does not carry"),
    upstream="none yet: CommonAttentionMetadata has no per-request slot for backends",
    remove_when="vLLM hands builders per-request facts (prompt length, sampling params)",
    fingerprints={
        CPU_0_32: {TARGET: "c99a315108942a23"},
        CUDA_0_32: {TARGET: "c99a315108942a23"},
        CUDA_0_33: {TARGET: "c99a315108942a23"},
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
