"""lminf-vllm: LM-Infinite attention (Λ mask + distance limit) as a vLLM attention backend.

vLLM calls `register()` in every process through the `vllm.general_plugins` entry point.
Nothing heavy happens at import: the package is also imported by a .pth line at interpreter
start (patches/cli_version.py).
"""

BACKEND_NAME = "LMINF"
BACKEND_PATH = "lminf_vllm.backend.LMInfBackend"


def register() -> None:
    """Apply the patches and add the LMINF attention backend. Idempotent."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from lminf_vllm import kv_cache, patches

    patches.apply_all()
    kv_cache.register_spec()
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, BACKEND_PATH)


def backend_member():
    """AttentionBackendEnum.LMINF, registering the plugin first (used when unpickling)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    return AttentionBackendEnum[BACKEND_NAME]


def is_selected(vllm_config) -> bool:
    """Whether this engine's attention backend is LMINF."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return getattr(backend, "name", None) == BACKEND_NAME
