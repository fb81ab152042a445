"""Pick the page size from the trained length on CPU when the user did not set --block-size.

The CPU platform sets 128-token blocks. LM-Infinite keeps every window distance exact only
for n_local <= L - B + 1, so for a short trained length (L = 256) 128-token pages would cut
the exact window in half. When LMINF is selected and the block size is not the user's, this
patch sets it to `lminf_vllm.config.auto_page_size(L)` and logs the choice.
"""

from ._patch import Patch, carries_mark, mark_applied, on_cpu_platform

NAME = "cpu_page_size"
TARGET = "vllm.platforms.cpu:CpuPlatform.check_and_update_config"


def _install() -> None:
    from vllm.platforms.cpu import CpuPlatform

    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm.log import get_logger

    logger = get_logger(__name__)
    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        original(cls, vllm_config)
        cache_config = vllm_config.cache_config
        if (not lminf_vllm.is_selected(vllm_config) or vllm_config.model_config is None
                or cache_config.user_specified_block_size):
            return
        parameters = lminf_config.user_parameters(vllm_config.additional_config)
        trained_length = lminf_config.trained_length(
            parameters, vllm_config.model_config.hf_text_config)
        cache_config.block_size = lminf_config.auto_page_size(trained_length)
        logger.info("lminf: page size %d tokens for trained length %d (set --block-size to "
                    "override)", cache_config.block_size, trained_length)

    CpuPlatform.check_and_update_config = classmethod(
        mark_applied(check_and_update_config, NAME))


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what="CpuPlatform.check_and_update_config picks the LMINF page size from L",
    why="the CPU default of 128-token pages shrinks the exact window for short L",
    upstream="none: a backend cannot state a preferred block size on CPU in vLLM 0.32",
    remove_when="the CPU platform asks the selected backend for its preferred block size",
    fingerprinted={TARGET: "d2960ad5d1836767"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
    applicable=on_cpu_platform,
)
