"""QueryRotation.with_angles: rows past the model's table, composed from its own rows."""

import torch

from lminf_vllm.attention import plan_tile_queries, rotation_for
from lminf_vllm.attention import cpu_attention
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig


def model_table(rows, rotary_dim=64, base=10000.0, scale=1.0, attention_factor=1.0):
    """A model's cos/sin cache: position / scale * inv_freq, times an attention factor."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = torch.arange(rows, dtype=torch.float64)[:, None] / scale * inv_freq
    return (torch.cat([angle.cos(), angle.sin()], dim=1) * attention_factor).float()


def test_composed_rows_equal_the_rotation_itself():
    # linear-scaled (factor 4) with a YaRN-style attention factor: the normalised table's row
    # a must be cos/sin of a / 4 * inv_freq, also past the L + 1 rows the model provides
    L = 256
    rotation = QueryRotation.from_model_table(
        model_table(L + 1, scale=4.0, attention_factor=1.3), L + 1, True)
    wide = rotation.with_angles(5 * L + 37)
    expected = model_table(5 * L + 37, scale=4.0)
    assert wide.cos_sin.shape == expected.shape
    torch.testing.assert_close(wide.cos_sin[: L + 1], rotation.cos_sin, rtol=0, atol=0)
    assert (wide.cos_sin - expected).abs().max() < 2e-6
    assert wide.rotary_dim == rotation.rotary_dim and wide.is_neox_style


def test_with_angles_keeps_a_table_that_is_long_enough():
    rotation = QueryRotation(model_table(300), 64, False)
    assert rotation.with_angles(300) is rotation and rotation.with_angles(12) is rotation


def test_cpu_path_tiles_and_table():
    config = LMInfConfig(n_global=64, n_local=256, trained_length=256, page_size=16,
                         max_prefill_chunk_tokens=4096)
    rotation = QueryRotation(model_table(257), 64, True)
    # the CPU kernel blocks a whole chunk's queries itself
    tile = plan_tile_queries(config, torch.device("cpu"))
    assert tile == cpu_attention.tile_queries(config) == 4096
    # it turns queries by query_angle, in [-(B - 1), L], and GEMM-sized blocks into their
    # first page's frame, up to 128 + B: here the model's own L + 1 rows serve
    assert (rotation_for(rotation, config, torch.device("cpu")).cos_sin.shape[0]
            == cpu_attention.angles_needed(config) == 257)
    # on CUDA the backend plans one tile per chunk too (the table grows with it: triton_prefill)
    assert plan_tile_queries(config, torch.device("cuda")) == 4096
