"""Run the worker's KV-spec collection inside the engine's vLLM config context.

The LMINF backend turns each layer's FullAttentionSpec into an LMInfSpec in
AttentionBackend.customize_spec, which needs the lminf parameters (G and R) from the
engine's config. customize_spec gets only the spec, and GPUModelRunner.get_kv_cache_spec
calls it outside set_current_vllm_config, so this patch wraps that method in the runner's
own config context. Nothing else changes: the context is the one model loading uses.
"""

from ._patch import Patch, carries_mark, mark_applied

NAME = "kv_spec_config_context"
TARGET = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_kv_cache_spec"


def _install() -> None:
    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    get_kv_cache_spec = GPUModelRunner.get_kv_cache_spec

    def get_kv_cache_spec_in_context(self):
        with set_current_vllm_config(self.vllm_config):
            return get_kv_cache_spec(self)

    GPUModelRunner.get_kv_cache_spec = mark_applied(get_kv_cache_spec_in_context, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what="GPUModelRunner.get_kv_cache_spec runs inside set_current_vllm_config",
    why=("AttentionBackend.customize_spec takes only the spec; the LMINF spec needs the "
         "engine's lminf parameters"),
    upstream="none: customize_spec is marked temporary upstream (vllm-project/vllm#42449)",
    remove_when="the backend builds its spec with the config (vllm-project/vllm#42449)",
    fingerprinted={TARGET: "cd02ed8d19e8350c"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
