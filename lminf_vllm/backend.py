"""vLLM glue: AttentionBackend / MetadataBuilder / Impl for LMINF. No math here.

build() turns vLLM's batch description into an AttentionPlan once per step; forward() writes
the step's keys and values with the plan's slot mapping and runs Λ-attention. The model's
rotary embedding already put the new keys in the page-local frame (patches/page_local_rope).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lminf_vllm import (BACKEND_NAME, attention, engine_context, receptive_field,
                         request_settings)
from lminf_vllm import config as lminf_config
from lminf_vllm.kv_cache import LMInfSpec
from lminf_vllm.patches.receptive_field_prefill import needs_every_output


class LMInfBackend(AttentionBackend):
    # The plugin writes the cache itself, with slots from its own plan (the ring of pages
    # has a layout vLLM's slot-mapping kernel does not know).
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    # Keys are stored rotated in the page-local frame; a quantised cache is not implemented.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["LMInfImpl"]:
        return LMInfImpl

    @staticmethod
    def get_builder_cls() -> type["LMInfMetadataBuilder"]:
        return LMInfMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        # The plan is built from the host's query lengths (StepPlanner.plan).
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    # The layer's KV spec (an LMInfSpec: G pinned pages plus a ring of R) is built from the
    # engine's config where vLLM hands it over, Attention.get_kv_cache_spec
    # (patches/layer_kv_spec.py), not in customize_spec, which gets no config.


@dataclass
class LMInfMetadata:
    plan: attention.AttentionPlan
    rotation: attention.QueryRotation
    num_actual_tokens: int


def refuse_speculative_decoding(vllm_config: VllmConfig) -> None:
    """Speculative decoding is refused at startup: its verification steps would need
    per-row query lengths from the device (adaptive verification) and exact context lengths
    for rows vLLM only bounds optimistically, and nothing here tests it against the oracle."""
    speculative = vllm_config.speculative_config
    if speculative is not None:
        method = getattr(speculative, "method", None)
        raise lminf_config.LMInfConfigError(
            f"lminf: speculative decoding is not supported (speculative_config is set, "
            f"method={method!r}); start the engine without --speculative-config")


def refuse_capture_batches_past_the_chunk_cap(vllm_config: VllmConfig,
                                              config: lminf_config.LMInfConfig) -> None:
    """Model runner V2 builds attention metadata for its piecewise captures from dummy
    batches of min(size, max_num_seqs) requests over the capture size; a dummy request longer
    than max_prefill_chunk_tokens would be refused by the plan in the middle of the capture,
    so the combination is refused at startup instead."""
    graph_mode = vllm_config.compilation_config.cudagraph_mode
    if (graph_mode is None or not graph_mode.has_piecewise_cudagraphs()
            or not vllm_config.use_v2_model_runner):
        return
    largest = vllm_config.compilation_config.max_cudagraph_capture_size or 0
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    per_request = -(-largest // max_num_seqs)
    if per_request > config.max_prefill_chunk_tokens:
        raise lminf_config.LMInfConfigError(
            f"lminf: CUDA-graph capture batches of {largest} tokens over max_num_seqs="
            f"{max_num_seqs} requests give {per_request} tokens per request, more than "
            f"max_prefill_chunk_tokens={config.max_prefill_chunk_tokens}; raise "
            "max_num_seqs or max_prefill_chunk_tokens, or lower max_cudagraph_capture_size")


def refuse_a_config_without_the_settings_processor(vllm_config: VllmConfig) -> None:
    """Per-request lminf_ values are checked and delivered by a logits processor that
    EngineArgs.create_engine_config adds (patches/long_context.py); an engine configured
    some other way would accept them and ignore them, so it is refused at startup."""
    name = request_settings.processor_name(vllm_config)
    if name not in (vllm_config.model_config.logits_processors or []):
        raise lminf_config.LMInfConfigError(
            f"lminf: the engine's logits_processors lack {name!r}, which checks and applies "
            "per-request lminf_n_global / lminf_n_local: build the config with "
            "EngineArgs.create_engine_config (LLM and vllm serve do), or call "
            "lminf_vllm.request_settings.enable(vllm_config) on it")


class LMInfMetadataBuilder(AttentionMetadataBuilder[LMInfMetadata]):
    # Decode batches replay full CUDA graphs: a batch of one query per request plans into
    # one group of one tile per request (padding requests included) with decode_pages
    # pages, in the planner's persistent arenas, so shapes and addresses repeat from step
    # to step. Prefill and mixed batches run attention eagerly (piecewise graphs).
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, LMInfSpec):
            raise RuntimeError(f"lminf: layers {layer_names} got a "
                               f"{type(kv_cache_spec).__name__}, not the ring spec "
                               "(patches/layer_kv_spec.py)")
        refuse_speculative_decoding(vllm_config)
        self.config = lminf_config.from_vllm_config(vllm_config)
        refuse_a_config_without_the_settings_processor(vllm_config)
        self.engine = engine_context.of(vllm_config)
        refuse_capture_batches_past_the_chunk_cap(vllm_config, self.config)
        attention.check_impl(self.config, device, lminf_config.triton_interpreter_on())
        self.rotation = attention.rotation_for(
            self.engine.query_rotation(kv_cache_spec.head_size), self.config, device)
        scheduler = vllm_config.scheduler_config
        graph_mode = vllm_config.compilation_config.cudagraph_mode
        full_graphs = graph_mode is not None and graph_mode.has_full_cudagraphs()
        self.planner = attention.StepPlanner(
            self.config, max_num_reqs=scheduler.max_num_seqs,
            max_num_tokens=scheduler.max_num_batched_tokens, device=device,
            num_ring_pages=self.config.num_ring_pages,
            tile_queries=attention.plan_tile_queries(self.config, device),
            # fixed decode shapes only where full CUDA graphs replay them (elsewhere
            # padding pages would only cost masked work)
            min_pages=attention.decode_pages(self.config) if full_graphs else 0)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LMInfMetadata:
        meta = common_attn_metadata
        # Exact here: vLLM documents it as optimistic only for async speculative decode
        # rows, and speculative decoding is refused (refuse_speculative_decoding). Host
        # side, so planning never waits for the device.
        seq_lens = meta.seq_lens_cpu_upper_bound
        if seq_lens is None:
            raise RuntimeError("lminf: vLLM built attention metadata without "
                               "seq_lens_cpu_upper_bound; the plan needs host seq_lens")
        num_reqs = meta.num_reqs
        n_global = n_local = None
        settings = self.engine.request_settings
        if settings is not None:  # None until the worker built its logits processors
            # rows: V2's request slots per row; None on V1, whose rows are the batch's
            n_global, n_local = settings.of_rows(meta.req_idx, num_reqs)
        plan = self.planner.plan(
            query_start_loc=meta.query_start_loc_cpu[: num_reqs + 1].numpy(),
            seq_lens=seq_lens[:num_reqs].numpy(),
            block_table=meta.block_table_tensor[:num_reqs],
            num_tokens=meta.num_actual_tokens,
            tail_start=self._tail_starts(num_reqs),
            n_global=n_global, n_local=n_local,
        )
        return LMInfMetadata(plan=plan, rotation=self.rotation,
                             num_actual_tokens=meta.num_actual_tokens)

    def _tail_starts(self, num_reqs: int) -> np.ndarray | None:
        """[num_reqs] each row's receptive-field tail start (0: none), as the scheduler
        jumps to it (patches/receptive_field_prefill.py); None when the engine skips
        nothing. Rows are the runner's input-batch rows, in order; rows past its requests
        (padding, dummy batches) have none. In decode a row's b grows with its stream but
        stays at or below num_tokens - R, below every decode query's window, so it hides
        no key a query can see."""
        runner = self.engine.model_runner() if self.engine.model_runner else None
        if not self.config.receptive_field_layers or runner is None:
            return None
        starts = np.zeros(num_reqs, dtype=np.int64)
        for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            request = runner.requests[req_id]
            # num_tokens: the prompt, or a resumed request's prompt and output so far
            starts[row] = receptive_field.request_tail_start(
                self.config, request.num_tokens, needs_every_output(request))
        return starts

    def build_for_cudagraph_capture(
            self, common_attn_metadata: CommonAttentionMetadata) -> LMInfMetadata:
        """The metadata a full decode graph is captured with: planned like every step,
        into the same arenas, so each replay reads what build() wrote there."""
        if common_attn_metadata.max_query_len != 1:
            raise RuntimeError(
                f"lminf: full CUDA graphs are captured for decode batches only (support "
                f"{self._cudagraph_support.name}), got max_query_len="
                f"{common_attn_metadata.max_query_len}")
        return self.build(0, common_attn_metadata)


class LMInfImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "a per-layer sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"kv_cache_dtype={kv_cache_dtype!r} (use 'auto')": kv_cache_dtype != "auto",
            f"attention type {attn_type!r} (decoder self-attention only)":
                attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
        }
        reasons = [name for name, present in unsupported.items() if present]
        if reasons:
            raise NotImplementedError(f"lminf: unsupported model feature(s): "
                                      f"{', '.join(reasons)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_sharing_target_layer_name = None
        self.attn_type = attn_type
        # vLLM builds attention layers inside set_current_vllm_config (as its own CPU
        # backend reads it): the profile run needs the engine's batch limits.
        vllm_config = get_current_vllm_config()
        self.config = lminf_config.from_vllm_config(vllm_config)
        self.engine = engine_context.of(vllm_config)
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.profiled = False

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: LMInfMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lminf: fused output quantization is not supported")
        if attn_metadata is None:  # no cache yet: vLLM's profile run, then graph warm-ups
            self._exercise_worst_case(query, output)
            return output
        n = attn_metadata.num_actual_tokens
        plan = attn_metadata.plan
        attention.write_kv(plan, key[:n], value[:n], kv_cache)
        attention.run(plan, query[:n].view(n, self.num_heads, self.head_size), kv_cache,
                      output[:n].view(n, self.num_heads, self.head_size),
                      attn_metadata.rotation, self.scale)
        return output

    def _exercise_worst_case(self, query: torch.Tensor, output: torch.Tensor) -> None:
        """On CUDA, the first forward without metadata is vLLM's memory profile run: run
        the step with the largest attention temporaries once (the prefill kernel's dense
        copy of each tile's pages), so the profile counts them before the KV cache takes
        the rest of the memory. The CPU sizes its cache from VLLM_CPU_KVCACHE_SPACE."""
        if self.profiled or not query.is_cuda:
            return
        self.profiled = True
        rotation = attention.rotation_for(self.engine.query_rotation(self.head_size),
                                          self.config, query.device)
        n = query.shape[0]
        attention.exercise_worst_case(
            self.config, query.view(n, self.num_heads, self.head_size),
            output.view(n, self.num_heads, self.head_size), self.num_kv_heads, rotation,
            self.scale, self.max_num_reqs)
