"""Startup checks through vLLM's own EngineArgs (no engine is started).

Bad lminf parameters fail in create_engine_config naming the parameter; max_model_len far
past the trained length is accepted with lminf and still refused without it; the page size
is chosen from L when the user did not set --block-size.
"""

import pytest
from vllm.engine.arg_utils import EngineArgs

from conftest import MODEL_DIR
from lminf_vllm.config import LMInfConfigError


def engine_config(**kwargs):
    return EngineArgs(model=str(MODEL_DIR), dtype="float32", **kwargs).create_engine_config()


def test_long_context_is_accepted_with_lminf():
    config = engine_config(attention_backend="lminf", max_model_len=200_000_000)
    assert config.model_config.max_model_len == 200_000_000


def test_long_context_is_still_refused_without_lminf(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(Exception, match="max_model_len"):
        engine_config(max_model_len=100_000)


def test_page_size_is_picked_from_the_trained_length():
    assert engine_config(attention_backend="lminf").cache_config.block_size == 16
    assert engine_config(attention_backend="lminf", block_size=32).cache_config.block_size == 32
    assert engine_config().cache_config.block_size == 128  # stock CPU default untouched


@pytest.mark.parametrize("parameters,name", [({"n_local": 100_000}, "n_local"),
                                             ({"n_global": -5}, "n_global"),
                                             ({"window": 3}, "window")])
def test_bad_parameters_fail_at_startup_naming_them(parameters, name):
    with pytest.raises(LMInfConfigError, match=name):
        engine_config(attention_backend="lminf", additional_config={"lminf": parameters})


def test_lminf_selected_through_attention_config_too():
    config = engine_config(attention_config={"backend": "lminf"}, max_model_len=1_000_000)
    assert config.attention_config.backend.name == "LMINF"
