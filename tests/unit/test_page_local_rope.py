"""The page-local RoPE patch with vLLM's real rotary classes (no engine).

* The query rotation is the module's own table: turning a query by angle a with it equals
  vLLM's own forward at position a (divided by the table's attention factor), for every
  angle 0..L, for default, linear, dynamic-NTK, YaRN and llama3 RoPE; angle L, one past a
  table of L rows, equals the model's rotation by L - 1 and then by 1.
* Per-engine state: get_rope under two LMINF engines with different (B, L) and under a
  stock engine gives three modules, each with its own engine's frame, and each engine's
  context holds only its own; the context goes away with its config.
"""

import gc

import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs

from conftest import MODEL_DIR
from lminf_vllm import engine_context
from lminf_vllm.attention.rotation import rotate
from lminf_vllm.patches import apply_all

HEAD_SIZE = 64
TRAINED_LENGTH = 256
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": TRAINED_LENGTH},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": TRAINED_LENGTH},
}
ROPE_CLASS = {"default": "RotaryEmbedding", "linear": "LinearScalingRotaryEmbedding",
              "dynamic": "DynamicNTKScalingRotaryEmbedding",
              "yarn": "YaRNScalingRotaryEmbedding", "llama3": "Llama3RotaryEmbedding"}


def engine_config(**lminf):
    """An LMINF engine's config with these lminf parameters; a stock one without any."""
    apply_all()
    selected = {"attention_backend": "lminf", "additional_config": {"lminf": lminf}} \
        if lminf else {}
    return EngineArgs(model=str(MODEL_DIR), dtype="float32",
                      max_model_len=4 * TRAINED_LENGTH if lminf else TRAINED_LENGTH,
                      **selected).create_engine_config()


@pytest.fixture(scope="module")
def lminf_config():
    return engine_config(n_global=32, n_local=128, trained_length=TRAINED_LENGTH)


def build_rope(vllm_config, rope_type, max_position=TRAINED_LENGTH, is_neox_style=True):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(vllm_config):
        return get_rope(HEAD_SIZE, max_position, is_neox_style,
                        dict(ROPE_PARAMETERS[rope_type]), torch.float32)


@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_query_rotation_is_the_models_own_rotation(lminf_config, rope_type, is_neox_style):
    rope = build_rope(lminf_config, rope_type, is_neox_style=is_neox_style)
    assert type(rope).__mro__[1].__name__ == ROPE_CLASS[rope_type]
    rotation = rope.lminf_query_rotation
    assert rotation.cos_sin.shape[0] == TRAINED_LENGTH + 1
    attention_factor = float(rope.cos_sin_cache[0, 0])
    rows = rope.cos_sin_cache.shape[0]
    query = torch.randn(1, HEAD_SIZE, generator=torch.Generator().manual_seed(0))
    for angle in range(TRAINED_LENGTH + 1):
        cos, sin = rotation.cos_sin_of(torch.tensor([angle]))
        ours = rotate(query, cos, sin, is_neox_style) * attention_factor
        if angle < rows:  # vLLM's own forward (no page-local frame) at this position
            models, _ = rope.forward_native(torch.tensor([angle]), query.clone())
        else:  # one past the table: the model's rotation by L - 1, then by 1
            once, _ = rope.forward_native(torch.tensor([angle - 1]), query.clone())
            models, _ = rope.forward_native(torch.tensor([1]), once / attention_factor)
        torch.testing.assert_close(ours, models, rtol=0, atol=2e-5,
                                   msg=lambda m: f"{rope_type} angle {angle}: {m}")


def test_default_table_stops_at_l_and_angle_l_is_composed(lminf_config):
    rope = build_rope(lminf_config, "default")
    assert rope.cos_sin_cache.shape[0] == TRAINED_LENGTH  # so row L is not the model's


def test_each_engine_gets_its_own_rope_module_and_context():
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    lminf_config = engine_config(n_global=32, n_local=128, trained_length=TRAINED_LENGTH)
    other = engine_config(n_global=32, n_local=64, trained_length=128)
    stock = engine_config()
    first, second = build_rope(lminf_config, "default"), build_rope(other, "default")
    plain = build_rope(stock, "default")
    assert build_rope(lminf_config, "default") is first  # get_rope's cache, per engine
    assert len({id(first), id(second), id(plain)}) == 3
    assert (first.lminf_page_size, second.lminf_page_size, plain.lminf_page_size) == \
        (lminf_config.cache_config.block_size, other.cache_config.block_size, None)
    assert first.lminf_query_rotation.cos_sin.shape[0] == TRAINED_LENGTH + 1
    assert second.lminf_query_rotation.cos_sin.shape[0] == 128 + 1
    assert isinstance(plain, RotaryEmbedding)
    assert engine_context.of(lminf_config).query_rotation(HEAD_SIZE) is \
        first.lminf_query_rotation
    assert engine_context.of(other).query_rotation(HEAD_SIZE) is second.lminf_query_rotation
    assert engine_context.of(stock).page_local_ropes == []

    positions = torch.arange(40)
    query = torch.randn(40, HEAD_SIZE)
    page = lminf_config.cache_config.block_size
    torch.testing.assert_close(first.forward(positions, query.clone())[0],
                               plain.forward_native(positions % page, query.clone())[0])
    torch.testing.assert_close(plain.forward(positions, query.clone())[0],
                               plain.forward_native(positions, query.clone())[0])

    key = id(other)
    del other, second
    gc.collect()
    assert key not in engine_context._contexts


def test_an_engine_without_a_rope_of_the_head_size_is_refused(lminf_config):
    with pytest.raises(RuntimeError, match="no rotary embedding with head size 48"):
        engine_context.of(lminf_config).query_rotation(48)


def test_ropes_with_different_tables_for_one_head_size_are_refused(lminf_config):
    build_rope(lminf_config, "default")
    build_rope(lminf_config, "yarn")
    with pytest.raises(RuntimeError, match="different tables"):
        engine_context.of(lminf_config).query_rotation(HEAD_SIZE)
