"""Let the CPU platform select LMINF (VLLM_NOTES §2).

CpuPlatform.get_attn_backend_cls answers CPU_ATTN for every backend it does not know, with
only an info log. This patch returns LMINF when it was selected, after the same
validate_configuration check the CUDA platform runs, and defers to the original otherwise.
"""

from ._patch import Patch, carries_mark, mark_applied, on_cpu_platform

NAME = "cpu_backend_selection"
TARGET = "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls"


def _install() -> None:
    from vllm.platforms.cpu import CpuPlatform

    import lminf_vllm

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or selected_backend.name != lminf_vllm.BACKEND_NAME:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(device_capability=None,
                                                 **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"lminf: the attention backend cannot serve this model: "
                             f"{'; '.join(reasons)}")
        return selected_backend.get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(mark_applied(get_attn_backend_cls, NAME))


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what="CpuPlatform.get_attn_backend_cls returns the LMINF backend when it is selected",
    why="the CPU platform silently replaces any backend but its own by CPU_ATTN",
    upstream="none: vLLM 0.32 has no out-of-tree attention backend hook on CPU",
    remove_when="CpuPlatform honours registered backends like CudaPlatform does",
    fingerprinted={TARGET: "b6eba62a9afd4d18"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
    applicable=on_cpu_platform,
)
