"""Accept max_model_len beyond the trained length when LMINF is selected, and only then.

vLLM refuses a max_model_len above the model's max_position_embeddings unless the user sets
VLLM_ALLOW_LONG_MAX_MODEL_LEN, because plain RoPE breaks past it. LM-Infinite never shows
RoPE a distance beyond L, so with LMINF the long length is the point. This patch wraps
EngineArgs.create_engine_config: when the arguments select LMINF, the max-length check
accepts the requested length; afterwards the lminf parameters are validated, so a bad value
fails at startup naming the parameter, and the engine's per-request settings processor is
added to its logits processors (request_settings.enable), so the API server, which builds
its request validation from the same config, checks every request's lminf_ values.
"""

import contextvars

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "long_context"
TARGET = "vllm.engine.arg_utils:EngineArgs.create_engine_config"
MAX_LEN_CHECK = "vllm.config.model:_get_and_verify_max_len"

_long_context_allowed = contextvars.ContextVar("lminf_long_context_allowed", default=False)


def _selects_lminf(engine_args) -> bool:
    import lminf_vllm

    requested = [engine_args.attention_backend,
                 getattr(engine_args.attention_config, "backend", None)]
    return any(str(getattr(b, "name", b)).upper() == lminf_vllm.BACKEND_NAME
               for b in requested if b is not None)


def _install() -> None:
    from vllm.config import model as model_config_module
    from vllm.engine.arg_utils import EngineArgs

    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm import request_settings

    verify_max_len = model_config_module._get_and_verify_max_len
    create_engine_config = EngineArgs.create_engine_config

    def _get_and_verify_max_len(*args, **kwargs):
        requested = kwargs.get("max_model_len")
        if not _long_context_allowed.get() or requested in (None, -1):
            return verify_max_len(*args, **kwargs)
        derived = verify_max_len(*args, **{**kwargs, "max_model_len": None})
        return max(int(requested), derived)

    def create_engine_config_lminf(self, *args, **kwargs):
        token = _long_context_allowed.set(_selects_lminf(self))
        try:
            vllm_config = create_engine_config(self, *args, **kwargs)
        finally:
            _long_context_allowed.reset(token)
        if lminf_vllm.is_selected(vllm_config):
            lminf_config.from_vllm_config(vllm_config)
            request_settings.enable(vllm_config)
        return vllm_config

    model_config_module._get_and_verify_max_len = _get_and_verify_max_len
    EngineArgs.create_engine_config = mark_applied(create_engine_config_lminf, NAME)


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("EngineArgs.create_engine_config lets max_model_len exceed the trained length when "
          "LMINF is selected, then validates the lminf parameters and adds the per-request "
          "settings logits processor (request_settings.py) to model_config.logits_processors"),
    why=("LM-Infinite exists to serve streams far past L; the check is right for plain RoPE. "
         "The settings processor must be in the config before the API server builds its "
         "request validation from it, and this is where LMINF's config is made"),
    upstream="none: the check is correct for every other backend",
    remove_when="vLLM lets an attention backend declare that it bounds RoPE distances",
    fingerprints={
        CPU_0_32: {TARGET: "b9b94288f46d2f67", MAX_LEN_CHECK: "5f1b7a92980bb33b"},
        CUDA_0_32: {TARGET: "b9b94288f46d2f67", MAX_LEN_CHECK: "5f1b7a92980bb33b"},
        CUDA_0_33: {TARGET: "1f916622074963ee", MAX_LEN_CHECK: "5f1b7a92980bb33b"},
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
