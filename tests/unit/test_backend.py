"""The vLLM glue with vLLM's own config objects (no engine): the declared CUDA-graph support
and what vLLM resolves from it, the builder's plans and capture hook, the startup refusals
(speculative decoding, attention_impl), and the profile run's worst case.

The builder looks up the model's query rotation table (patches/page_local_rope), which only
a model build fills; these tests hand it a table through that lookup.
"""

import numpy as np
import pytest
import torch
from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from conftest import MODEL_DIR
from lminf_vllm import attention, backend, engine_context
from lminf_vllm import config as lminf_config
from lminf_vllm.kv_cache import LMInfSpec
from lminf_vllm.attention import build_plan, cpu_attention, decode_pages, worst_case_prefill
from lminf_vllm.attention.plan import DEFAULT_TILE_QUERIES, max_tile_pages
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig, LMInfConfigError

HEAD_DIM, KV_HEADS = 64, 2
SPEC = FullAttentionSpec(block_size=16, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                         dtype=torch.float32)


def vllm_config(**kwargs):
    return EngineArgs(model=str(MODEL_DIR), dtype="float32", attention_backend="lminf",
                      max_num_seqs=4, max_num_batched_tokens=256, **kwargs
                      ).create_engine_config()


def rotation_table(head_dim, trained_length):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    return QueryRotation(torch.cat([angle.cos(), angle.sin()], 1).float(), head_dim, True)


@pytest.fixture
def rope_table(monkeypatch):
    rotation = rotation_table(HEAD_DIM, 256)
    monkeypatch.setattr(engine_context.EngineContext, "query_rotation",
                        lambda self, head_size: rotation)
    return rotation


def builder_for(config):
    spec = LMInfSpec.from_attention_spec(SPEC, lminf_config.from_vllm_config(config))
    return backend.LMInfMetadataBuilder(spec, ["layers.0.self_attn.attn"], config,
                                        torch.device("cpu"))


def common_metadata(query_lens, seq_lens, table, num_tokens=None):
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]), dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    num_tokens = num_tokens or int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(seq_lens),
        num_actual_tokens=num_tokens, max_query_len=int(max(query_lens)),
        max_seq_len=int(max(seq_lens)), block_table_tensor=table,
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64), seq_lens_cpu_upper_bound=seq)


def ring_table(config, num_reqs):
    width = config.num_pinned_pages + config.num_ring_pages
    return (1 + torch.arange(num_reqs * width, dtype=torch.int32)).view(num_reqs, width)


def test_declared_support_keeps_full_decode_graphs():
    support = backend.LMInfMetadataBuilder.get_cudagraph_support(vllm_config(), SPEC)
    assert support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    for mode in (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY):
        compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)
        assert compilation.resolve_cudagraph_mode_and_sizes(support, "LMInfBackend") == mode
    # full graphs of mixed batches are not claimed: vLLM keeps them for decode only
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                    cudagraph_mode=CUDAGraphMode.FULL)
    resolved = compilation.resolve_cudagraph_mode_and_sizes(support, "LMInfBackend")
    assert resolved.decode_mode() == CUDAGraphMode.FULL
    assert resolved.mixed_mode() != CUDAGraphMode.FULL


def test_build_plans_vllm_metadata_like_build_plan(rope_table):
    config = vllm_config()
    builder = builder_for(config)
    lminf = builder.config
    table = ring_table(lminf, 3)
    meta = builder.build(0, common_metadata([1, 40, 1], [300, 100, 17], table))
    expected = build_plan(lminf, np.array([0, 1, 41, 42]), np.array([300, 100, 17]), table,
                          num_ring_pages=lminf.num_ring_pages)
    assert meta.num_actual_tokens == 42 and meta.rotation is builder.rotation
    assert torch.equal(meta.plan.slot_block, expected.slot_block)
    for got, want in zip(meta.plan.groups, expected.groups):
        assert torch.equal(got.page_block, want.page_block)
        assert torch.equal(got.page_base, want.page_base)


def test_capture_metadata_is_the_fixed_decode_shape_at_the_replay_addresses(rope_table):
    config = vllm_config()
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    builder = builder_for(config)
    width = decode_pages(builder.config)
    # what vLLM captures with: every request one query at position 0, zeroed block table
    captured = builder.build_for_cudagraph_capture(
        common_metadata([1] * 4, [1] * 4, torch.zeros(4, 2 + 20, dtype=torch.int32)))
    (group,) = captured.plan.groups
    assert group.query_rows.shape == (4, 1) and group.page_block.shape == (4, width)
    addresses = [x.data_ptr() for x in (captured.plan.slot_block, captured.plan.slot_offset,
                                        group.query_rows, group.query_position,
                                        group.page_block, group.page_base)]
    # a later step replaying that graph: two real decodes, two padding requests
    table = ring_table(builder.config, 4)
    step = builder.build(0, common_metadata([1, 1, 0, 0], [500, 77, 0, 0], table,
                                            num_tokens=4))
    (replayed,) = step.plan.groups
    assert replayed.page_block.shape == (4, width)
    assert [x.data_ptr() for x in (step.plan.slot_block, step.plan.slot_offset,
                                   replayed.query_rows, replayed.query_position,
                                   replayed.page_block, replayed.page_base)] == addresses
    assert replayed.query_position[:, 0].tolist() == [499, 76, 0, 0]
    # the capture-time views now hold the step's values: what the graph reads on replay
    assert torch.equal(group.page_block, replayed.page_block)


def test_capture_of_a_non_decode_batch_is_refused(rope_table):
    builder = builder_for(vllm_config())
    with pytest.raises(RuntimeError, match="decode batches only"):
        builder.build_for_cudagraph_capture(
            common_metadata([2, 1], [2, 1], torch.zeros(2, 22, dtype=torch.int32)))


def test_missing_host_seq_lens_fail_loudly(rope_table):
    builder = builder_for(vllm_config())
    meta = common_metadata([1], [10], ring_table(builder.config, 1))
    meta.seq_lens_cpu_upper_bound = None
    with pytest.raises(RuntimeError, match="seq_lens_cpu_upper_bound"):
        builder.build(0, meta)


def test_speculative_decoding_is_refused_at_startup_naming_the_option():
    config = vllm_config(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                             "prompt_lookup_max": 3})
    with pytest.raises(LMInfConfigError, match="speculative_config.*ngram"):
        builder_for(config)


@pytest.mark.parametrize("impl,path,tile", [
    ("auto", "cpu", cpu_attention.tile_queries), ("reference", "reference",
                                                  lambda config: DEFAULT_TILE_QUERIES)])
def test_the_cpu_runs_its_path_unless_told_otherwise(impl, path, tile, rope_table):
    config = vllm_config(additional_config={"lminf": {"attention_impl": impl}})
    builder = builder_for(config)
    assert attention.impl_for(builder.config, torch.device("cpu")) == path
    assert builder.planner.tile_queries == tile(builder.config)
    meta = builder.build(0, common_metadata([1, 7], [40, 7], ring_table(builder.config, 2)))
    assert sorted(g.query_rows.shape[1] for g in meta.plan.groups) == [1, 7]


def test_a_cpu_kernel_that_cannot_be_built_fails_naming_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    with pytest.raises(LMInfConfigError, match="(?s)broken.cpp.*attention_impl='reference'"):
        cpu_attention.build(broken, "lminf_broken")


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch, rope_table):
    config = vllm_config(additional_config={"lminf": {"attention_impl": "triton"}})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(LMInfConfigError, match="attention_impl='triton'.*TRITON_INTERPRET=1"):
        builder_for(config)


def test_an_unknown_attention_impl_fails_at_startup_naming_it():
    with pytest.raises(LMInfConfigError, match="attention_impl='cuda'"):
        vllm_config(additional_config={"lminf": {"attention_impl": "cuda"}})


def test_the_impl_tells_auto_from_the_device():
    config = LMInfConfig(n_global=64, n_local=256, trained_length=256, page_size=16,
                         max_prefill_chunk_tokens=256)
    assert attention.impl_for(config, torch.device("cuda")) == "triton"
    assert attention.impl_for(config, torch.device("cpu")) == "cpu"
    assert attention.check_impl(config, torch.device("cpu"), triton_interpreted=False) \
        == "cpu"


def test_forward_without_metadata_on_the_cpu_leaves_output_alone():
    config = vllm_config()
    with set_current_vllm_config(config):
        impl = backend.LMInfImpl(4, HEAD_DIM, 0.125, KV_HEADS, None, None, "auto")
    query = torch.randn(8, 4 * HEAD_DIM)
    output = torch.full_like(query, 7.0)
    assert impl.forward(None, query, query, query, torch.empty(0), None, output) is output
    assert (output == 7.0).all() and not impl.profiled


@pytest.mark.parametrize("n_global,n_local,page,chunk,reqs,tokens", [
    (64, 256, 16, 256, 128, 2048), (5, 20, 4, 7, 3, 40), (0, 241, 16, 64, 256, 512),
    (100, 64, 16, 33, 8, 8)])
def test_the_profile_step_has_the_largest_dense_page_copy(n_global, n_local, page, chunk,
                                                         reqs, tokens):
    config = LMInfConfig(n_global=n_global, n_local=n_local, trained_length=256,
                         page_size=page, max_prefill_chunk_tokens=chunk)
    num_tiles, length = worst_case_prefill(config, reqs, tokens)
    brute = max(min(reqs, tokens // t) * max_tile_pages(config, t)
                for t in range(2, min(chunk, tokens) + 1))
    assert num_tiles * max_tile_pages(config, length) == brute
    # the step it runs reaches that bound with real page sets
    query = torch.randn(tokens, 2, 8)
    plan = attention.exercise_worst_case(config, query, torch.empty_like(query), 1,
                                         rotation_table(8, 256), 0.3, reqs)
    (group,) = plan.groups
    assert group.query_rows.shape == (num_tiles, length)
    assert group.page_block.shape[1] == max_tile_pages(config, length)
    assert (group.page_base >= 0).all()



def test_v2_capture_batches_longer_than_a_chunk_are_refused_at_startup(monkeypatch):
    config = vllm_config(additional_config={"lminf": {"max_prefill_chunk_tokens": 32}})
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    config.compilation_config.max_cudagraph_capture_size = 256   # 64 tokens x 4 requests
    lminf = backend.lminf_config.from_vllm_config(config)
    with pytest.raises(LMInfConfigError, match="max_prefill_chunk_tokens=32"):
        backend.refuse_capture_batches_past_the_chunk_cap(config, lminf)
    config.compilation_config.max_cudagraph_capture_size = 128   # 32 x 4: fits
    backend.refuse_capture_batches_past_the_chunk_cap(config, lminf)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")          # V1 builds none
    config.compilation_config.max_cudagraph_capture_size = 256
    backend.refuse_capture_batches_past_the_chunk_cap(config, lminf)
