"""vLLM glue: AttentionBackend / MetadataBuilder / Impl for LMINF. No math here.

build() turns vLLM's batch description into an AttentionPlan once per step; forward() writes
the step's keys and values with the plan's slot mapping and runs Λ-attention. The model's
rotary embedding already put the new keys in the page-local frame (patches/page_local_rope).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lminf_vllm import BACKEND_NAME, attention
from lminf_vllm import config as lminf_config
from lminf_vllm.patches.page_local_rope import query_rotation_for


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
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The layer's spec as an LMInfSpec: rows of G pinned pages plus a ring of R."""
        from vllm.config import get_current_vllm_config_or_none

        from lminf_vllm.kv_cache import LMInfSpec

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            raise RuntimeError("lminf: customize_spec needs the engine's vLLM config "
                               "(called outside set_current_vllm_config)")
        return LMInfSpec.from_attention_spec(spec, lminf_config.from_vllm_config(vllm_config))


@dataclass
class LMInfMetadata:
    plan: attention.AttentionPlan
    rotation: attention.QueryRotation
    num_actual_tokens: int


class LMInfMetadataBuilder(AttentionMetadataBuilder[LMInfMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = lminf_config.from_vllm_config(vllm_config)
        self.rotation = attention.rotation_for(query_rotation_for(kv_cache_spec.head_size),
                                               self.config, device)
        self.tile_queries = attention.plan_tile_queries(self.config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LMInfMetadata:
        meta = common_attn_metadata
        seq_lens = meta.seq_lens_cpu_upper_bound
        if seq_lens is None:
            seq_lens = meta.seq_lens.cpu()
        num_reqs = meta.num_reqs
        plan = attention.build_plan(
            self.config,
            query_start_loc=meta.query_start_loc_cpu[: num_reqs + 1].numpy(),
            seq_lens=seq_lens[:num_reqs].numpy(),
            block_table=meta.block_table_tensor[:num_reqs],
            num_ring_pages=self.config.num_ring_pages,
            tile_queries=self.tile_queries,
        )
        return LMInfMetadata(plan=plan, rotation=self.rotation,
                             num_actual_tokens=meta.num_actual_tokens)


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

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: LMInfMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lminf: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run: no cache yet
            return output
        n = attn_metadata.num_actual_tokens
        plan = attn_metadata.plan
        attention.write_kv(plan, key[:n], value[:n], kv_cache)
        attention.run(plan, query[:n].view(n, self.num_heads, self.head_size), kv_cache,
                      output[:n].view(n, self.num_heads, self.head_size),
                      attn_metadata.rotation, self.scale)
        return output
