"""Config: defaults from the model, validation messages that name the parameter."""

import json
from types import SimpleNamespace

import pytest

from lminf_vllm import config as lminf_config
from lminf_vllm.config import LMInfConfigError, auto_page_size, build_config
from conftest import MODEL_DIR


def hf_config(**overrides):
    values = json.loads((MODEL_DIR / "config.json").read_text())
    values.update(overrides)
    return SimpleNamespace(**values)


def make(parameters=None, page_size=16, **hf):
    return build_config(parameters or {}, page_size=page_size, hf_config=hf_config(**hf),
                        max_num_batched_tokens=512)


def test_defaults_come_from_the_model():
    cfg = make()
    assert (cfg.n_global, cfg.n_local, cfg.trained_length, cfg.page_size) == (64, 256, 256, 16)
    assert cfg.num_pinned_pages == 4
    # the default chunk cap is n_local (the batch budget of 512 is larger)
    assert cfg.max_prefill_chunk_tokens == 256
    assert cfg.num_ring_pages == -(-(256 + 256 - 1) // 16) + 1


def test_scaled_rope_uses_the_original_length():
    cfg = make(max_position_embeddings=8192,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                "original_max_position_embeddings": 2048})
    assert cfg.trained_length == 2048


@pytest.mark.parametrize("parameters,name", [
    ({"n_global": -1}, "n_global"),
    ({"n_local": 0}, "n_local"),
    ({"n_local": 257}, "n_local"),
    ({"n_local": 1.5}, "n_local"),
    ({"trained_length": 8}, "trained_length"),
    ({"max_prefill_chunk_tokens": 0}, "max_prefill_chunk_tokens"),
    ({"n_globl": 3}, "n_globl"),
])
def test_bad_values_name_the_parameter_and_range(parameters, name):
    with pytest.raises(LMInfConfigError, match=name) as error:
        make(parameters)
    if name != "n_globl":
        assert "allowed range" in str(error.value) or "must be an integer" in str(error.value)


@pytest.mark.parametrize("hf,reason", [
    ({"rope_parameters": None}, "no RoPE"),
    ({"alibi": True}, "ALiBi"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ({"rope_parameters": {"rope_type": "default", "mrope_section": [1, 2]}}, "mrope"),
])
def test_unsupported_models_fail_with_the_reason(hf, reason):
    with pytest.raises(LMInfConfigError, match=reason):
        make(**hf)


def test_gptj_rotary_dim_counts_as_rope():
    """GPT-J states RoPE as rotary_dim alone (no rope_parameters); vLLM serves it with RoPE."""
    cfg = make(rope_parameters=None, rotary_dim=32)
    assert cfg.trained_length == 256
    with pytest.raises(LMInfConfigError, match="no RoPE"):
        make(rope_parameters=None, rotary_dim=32, rotary=False)


def test_models_with_their_own_sliding_window_are_refused():
    with pytest.raises(LMInfConfigError, match="sliding window"):
        build_config({}, page_size=16, hf_config=hf_config(), max_num_batched_tokens=512,
                     sliding_window=4096)


@pytest.mark.parametrize("trained_length,page_size", [(256, 16), (2048, 128), (8192, 128),
                                                       (100, 16), (1024, 64)])
def test_auto_page_size_keeps_pages_small_against_l(trained_length, page_size):
    assert auto_page_size(trained_length) == page_size


def test_additional_config_must_be_a_mapping():
    with pytest.raises(LMInfConfigError, match="mapping"):
        lminf_config.user_parameters({"lminf": 5})


def test_receptive_field_prefill_switch():
    common = dict(page_size=16, hf_config=hf_config(), max_num_batched_tokens=512,
                  receptive_field_layers=6)
    assert build_config({}, **common).receptive_field_layers == 6  # on by default
    assert build_config({"receptive_field_prefill": False}, **common).receptive_field_layers == 0
    with pytest.raises(LMInfConfigError, match="receptive_field_prefill='no' must be true"):
        build_config({"receptive_field_prefill": "no"}, **common)


def test_stream_state_settings():
    common = dict(page_size=16, hf_config=hf_config(), max_num_batched_tokens=512)
    config = build_config({}, **common)
    assert (config.stream_states, config.stream_idle_timeout_s, config.continuation) == (
        16, 600, False)
    config = build_config({"stream_states": 0, "stream_idle_timeout_s": 2.5,
                           "continuation": True}, **common)
    assert (config.stream_states, config.stream_idle_timeout_s, config.continuation) == (
        0, 2.5, True)
    for bad, name in (({"stream_states": -1}, "stream_states"),
                      ({"stream_states": 1.5}, "stream_states"),
                      ({"stream_idle_timeout_s": 0}, "stream_idle_timeout_s"),
                      ({"stream_idle_timeout_s": "600"}, "stream_idle_timeout_s"),
                      ({"continuation": 1}, "continuation")):
        with pytest.raises(LMInfConfigError, match=name):
            build_config(bad, **common)
