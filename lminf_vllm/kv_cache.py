"""KV cache policy: G pinned pages plus a ring of R pages per request (DESIGN §3).

A request owns at most G + R blocks for its whole life. They are claimed as its stream
grows (the first G + R logical pages map one-to-one onto them); once it holds G + R, the
ring is full and every later page overwrites the oldest ring page in place
(`rope_frame.table_slot`): no allocation and no freeing mid-stream. All blocks go back to
the pool when the request finishes, is aborted or is preempted (the base manager's
`free`); a preempted request rebuilds its ring by recomputing its stream's global prefix
and last n_layers · (n_local - 1) + 1 tokens (patches/receptive_field_prefill.py).

Prefix caching cannot work on recycled pages (a ring page holds different tokens over
time), so the spec opts out of it and the manager never reports a hit. What works instead
is keeping a finished stream's whole state (lminf_vllm/sessions.py): `detach` takes a
request's blocks out of the manager without freeing them, and a later request that
continues the stream adopts a copy of them (`expect_adoption`, then vLLM's prefix-hit
path calls `add_local_computed_blocks`): fresh blocks in the same columns, filled by vLLM's
copy-on-write channel before the step's forward.

Modelled on vLLM's CircularBufferSpec / CircularBufferManager (one ring block per
request), generalised to G + R blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import Request

from lminf_vllm import metrics
from lminf_vllm.config import LMInfConfig


@dataclass
class GroupPages:
    """One KV cache group's part of a kept stream state: its blocks in block-table order
    and the manager's bookkeeping of the stream (tokens and pages written, pages its
    receptive-field prefill skipped)."""

    blocks: list[KVCacheBlock]
    tokens: int
    pages_written: int
    skipped_pages: int

    @property
    def num_pages(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True, kw_only=True)
class LMInfSpec(FullAttentionSpec):
    """FullAttentionSpec whose request rows hold G pinned pages plus a ring of R pages.

    Subclassing FullAttentionSpec keeps the layer's kind FULL_ATTENTION (CPU zeroes new
    blocks; layers group with other full-attention layers); the page layout is unchanged.
    """

    num_pinned_pages: int = 0
    num_ring_pages: int = 0
    trained_length: int = 0  # L, for the tokens-past-L counter only

    @classmethod
    def from_attention_spec(cls, spec: AttentionSpec, config: LMInfConfig) -> "LMInfSpec":
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)
                if f.init and hasattr(spec, f.name)}
        return cls(**base, num_pinned_pages=config.num_pinned_pages,
                   num_ring_pages=config.num_ring_pages,
                   trained_length=config.trained_length)

    @property
    def num_pages_per_request(self) -> int:
        """G + R: the fixed width of a request's block-table row."""
        return self.num_pinned_pages + self.num_ring_pages

    @property
    def prefix_cacheable(self) -> bool:
        return False

    @property
    def uses_slot_mapping(self) -> bool:
        # The backend writes the cache through its own plan (ring addressing). vLLM's V2
        # runner honours this and skips its slot mapping; the V1 runner ignores it, so
        # patches/ring_slot_mapping.py makes V1's mapping follow the ring instead.
        return False

    @property
    def block_table_token_alignment(self) -> int | None:
        # The row is exactly G + R columns; alignment would only add unused ones.
        return None

    def max_memory_usage_bytes(self, vllm_config) -> int:
        del vllm_config
        return self.num_pages_per_request * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        del vllm_config, max_len
        return self.num_pages_per_request

    @classmethod
    def merge(cls, specs: list["LMInfSpec"]) -> "LMInfSpec":
        rings = {(s.num_pinned_pages, s.num_ring_pages, s.trained_length) for s in specs}
        if len(rings) != 1:
            raise ValueError(f"lminf: layers of one KV cache group disagree on (G, R, L): "
                             f"{sorted(rings)}")
        merged = FullAttentionSpec.merge(specs)
        pinned, ring, trained_length = rings.pop()
        return cls(**{f.name: getattr(merged, f.name) for f in fields(FullAttentionSpec)
                      if f.init},
                   num_pinned_pages=pinned, num_ring_pages=ring,
                   trained_length=trained_length)


class LMInfManager(FullAttentionManager):
    """Claims up to G + R blocks per request, then recycles them; never frees mid-stream."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: LMInfSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.counters = metrics.RingCounters()
        # request id -> (tokens, pages written) of its stream so far, for the counters
        self._stream_extent: dict[str, tuple[int, int]] = {}
        # request id -> logical pages its receptive-field prefill skipped (never written)
        self._skipped_pages: dict[str, int] = {}
        # request id -> the kept state it is about to adopt (sessions.py)
        self._adoptions: dict[str, GroupPages] = {}

    @property
    def has_positionally_stable_blocks(self) -> bool:
        # A ring column holds a different page of the stream after each wrap.
        return False

    def _num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks still to claim so that the request holds min(pages(num_tokens), G + R)."""
        cap = self.kv_cache_spec.num_pages_per_request
        held = len(self.req_to_blocks.get(request_id, ()))
        return max(min(cdiv(num_tokens, self.block_size), cap) - held, 0)

    def _claim(self, request_id: str, num_tokens: int,
               record_for_zeroing: bool = True) -> list[KVCacheBlock]:
        num_new = self._num_blocks_needed(request_id, num_tokens)
        if num_new == 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new)
        req_blocks = self.req_to_blocks[request_id]
        req_blocks.extend(new_blocks)
        self.counters.on_blocks_held(len(req_blocks) - num_new, len(req_blocks),
                                     self.kv_cache_spec.num_pinned_pages)
        if self._record_new_block_ids and record_for_zeroing:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[KVCacheBlock],
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int,
                                   apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        # Admission and per-step growth are both capped by G + R - held: a request of any
        # length is admitted with G + R blocks.
        return self._num_blocks_needed(request_id, num_tokens)

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int) -> list[KVCacheBlock]:
        tokens_before, pages_before = self._stream_extent.get(request_id, (0, 0))
        if num_tokens > tokens_before:
            spec = self.kv_cache_spec
            pages = cdiv(num_tokens, self.block_size) - self._skipped_pages.get(request_id, 0)
            self.counters.on_stream_growth(pages_before, pages, tokens_before, num_tokens,
                                           spec.num_pages_per_request, spec.trained_length)
            self._stream_extent[request_id] = (num_tokens, pages)
        return self._claim(request_id, num_tokens)

    def on_prompt_skipped(self, request_id: str, skip_start: int, tail_start: int,
                          resumed: bool = False) -> None:
        """Receptive-field prefill jumped the request from skip_start to the page-aligned
        tail_start (patches/receptive_field_prefill.py): count the tokens (as a recovery's
        when the request is rebuilding its stream after preemption), and keep the ring
        counters to the slots actually written (the tail continues the stream's pages
        where the prefix left them, at tail_start's true positions)."""
        if resumed:
            self.counters.recompute_tokens_skipped += tail_start - skip_start
        else:
            self.counters.prompt_tokens_skipped += tail_start - skip_start
        # added to what an adopted stream state had skipped before (sessions.py)
        self._skipped_pages[request_id] = (self._skipped_pages.get(request_id, 0)
                                           + tail_start // self.block_size
                                           - cdiv(skip_start, self.block_size))
        tokens, pages = self._stream_extent.get(request_id, (0, 0))
        trained_length = self.kv_cache_spec.trained_length
        self.counters.requests_past_trained_length += (int(tail_start > trained_length)
                                                       - int(tokens > trained_length))
        self._stream_extent[request_id] = (tail_start, pages)

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self._adoptions.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        self.counters.on_blocks_held(len(blocks), 0, self.kv_cache_spec.num_pinned_pages)
        self._skipped_pages.pop(request_id, None)
        tokens, _ = self._stream_extent.pop(request_id, (0, 0))
        self.counters.on_stream_end(tokens, self.kv_cache_spec.trained_length)
        return blocks

    def allocate_external_computed_blocks(self, request_id: str,
                                          num_local_computed_tokens: int,
                                          num_external_computed_tokens: int,
                                          record_for_zeroing: bool = True) -> None:
        self._claim(request_id, num_local_computed_tokens + num_external_computed_tokens,
                    record_for_zeroing)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes: BlockHashList, max_length: int,
                               kv_cache_group_ids: list[int], block_pool: BlockPool,
                               kv_cache_spec: KVCacheSpec, drop_eagle_block: bool,
                               alignment_tokens: int, dcp_world_size: int = 1,
                               pcp_world_size: int = 1):
        return tuple([] for _ in kv_cache_group_ids), 0

    def expect_adoption(self, request_id: str, pages: GroupPages) -> None:
        """The next computed blocks this request gets are a kept state's (sessions.py)."""
        self._adoptions[request_id] = pages

    def add_local_computed_blocks(self, request_id: str,
                                  new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        """Adopt a kept stream state: fresh blocks in the same block-table columns, each
        filled from its source by vLLM's copy-on-write channel (the worker copies before
        the step's forward), so the kept state is never written by this request."""
        if not new_computed_blocks:
            return
        pages = self._adoptions.pop(request_id, None)
        if pages is None or list(new_computed_blocks) != pages.blocks:
            raise RuntimeError("lminf: a ring request got prefix-cache blocks that are no "
                               "kept stream state; prefix caching must be off for lminf")
        if self.req_to_blocks.get(request_id):
            raise RuntimeError(f"lminf: request {request_id} adopts a stream state but "
                               f"already holds blocks")
        copies = self.block_pool.get_new_blocks(len(pages.blocks))
        self.req_to_blocks[request_id].extend(copies)
        for source, copy in zip(pages.blocks, copies):
            # both ends retained until the copy has run (the scheduler frees the extra
            # refs with the step's fence, as for vLLM's own CoW copies)
            source.ref_cnt += 1
            copy.ref_cnt += 1
            self._pending_cow_copies.append((source, copy))
        spec = self.kv_cache_spec
        self.counters.on_blocks_held(0, len(copies), spec.num_pinned_pages)
        self.counters.requests_past_trained_length += int(pages.tokens
                                                          > spec.trained_length)
        self._stream_extent[request_id] = (pages.tokens, pages.pages_written)
        if pages.skipped_pages:
            self._skipped_pages[request_id] = pages.skipped_pages

    def detach(self, request_id: str) -> GroupPages:
        """Take a finished request's blocks and stream bookkeeping out of the manager
        without freeing the blocks (they become a kept state, sessions.py)."""
        skipped = self._skipped_pages.get(request_id, 0)
        tokens, pages_written = self._stream_extent.get(request_id, (0, 0))
        blocks = self.pop_blocks_for_free(request_id)
        return GroupPages(blocks, tokens, pages_written, skipped)

    def free_kept(self, pages: GroupPages) -> None:
        """Return a kept state's blocks to the pool."""
        self.block_pool.free_blocks(reversed(pages.blocks))

    def cache_blocks(self, request: Request, num_tokens: int,
                     retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int]) -> None:
        return

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        return

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0


def register_spec() -> None:
    """Map LMInfSpec to LMInfManager in vLLM's registry, grouped with full attention.

    The built-ins are registered first: the registry fills itself only while it is empty,
    so registering ours first would leave FullAttentionSpec without a manager
    (VLLM_NOTES B3). Idempotent.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LMInfSpec, LMInfManager,
                                 uniform_type_base_spec=FullAttentionSpec)


def lminf_managers(kv_cache_manager) -> list[LMInfManager]:
    """The LMInfManagers of a scheduler's KVCacheManager, one per lminf KV cache group."""
    return [manager for manager in kv_cache_manager.coordinator.single_type_managers
            if isinstance(manager, LMInfManager)]
