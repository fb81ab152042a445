"""Give LMINF layers their LMInfSpec where vLLM hands the engine's config over.

The backend's KV spec (G pinned pages plus a ring of R, `lminf_vllm.kv_cache.LMInfSpec`)
needs the engine's lminf parameters. vLLM's backend hook, AttentionBackend.customize_spec,
gets only the spec, and neither runner calls it inside the engine's config context (model
runner v2's `attn_utils.get_kv_cache_spec` has none at all). Both runners (v1
`GPUModelRunner.get_kv_cache_spec`, v2 `attn_utils.get_kv_cache_spec`) ask each layer for
its spec with `Attention.get_kv_cache_spec(vllm_config)`, so this patch wraps that method:
for a layer whose backend is LMINF, the full-attention spec it returns becomes the
LMInfSpec of the vllm_config passed in. Every other layer is untouched.
"""

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "layer_kv_spec"
TARGET = "vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec"
# The callers that must keep asking the layer with the engine's config (v1 and v2).
V1_CALLER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_kv_cache_spec"
V2_CALLER = "vllm.v1.worker.gpu.attn_utils:get_kv_cache_spec"


def lminf_spec_for(backend, spec, vllm_config):
    """The LMInfSpec of a full-attention `spec` when `backend` is LMINF, else `spec`."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from lminf_vllm import BACKEND_NAME
    from lminf_vllm import config as lminf_config
    from lminf_vllm.kv_cache import LMInfSpec

    if backend.get_name() != BACKEND_NAME or not isinstance(spec, FullAttentionSpec) \
            or isinstance(spec, LMInfSpec):
        return spec
    return LMInfSpec.from_attention_spec(spec, lminf_config.from_vllm_config(vllm_config))


def _install() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    get_kv_cache_spec = Attention.get_kv_cache_spec

    def get_kv_cache_spec_lminf(self, vllm_config):
        return lminf_spec_for(self.attn_backend, get_kv_cache_spec(self, vllm_config),
                              vllm_config)

    Attention.get_kv_cache_spec = mark_applied(get_kv_cache_spec_lminf, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("Attention.get_kv_cache_spec returns the LMInfSpec built from the vllm_config it "
          "is given when the layer's backend is LMINF"),
    why=("AttentionBackend.customize_spec takes only the spec; the LMINF spec needs the "
         "engine's lminf parameters, and model runner v2 calls it with no config current"),
    upstream="none: customize_spec is marked temporary upstream (vllm-project/vllm#42449)",
    remove_when="the backend builds its spec with the config (vllm-project/vllm#42449)",
    fingerprints={
        CPU_0_32: {
            TARGET: "2b66919f6a191bc6",
            V1_CALLER: "cd02ed8d19e8350c",
            V2_CALLER: "08df87bef5a1b48c",
        },
        CUDA_0_32: {
            TARGET: "2b66919f6a191bc6",
            V1_CALLER: "cd02ed8d19e8350c",
            V2_CALLER: "08df87bef5a1b48c",
        },
        CUDA_0_33: {
            TARGET: "2b66919f6a191bc6",
            V1_CALLER: "d6f8423e12d09cd2",
            V2_CALLER: "4392894d6c0a3836",
        },
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
