"""Compute vLLM's slot mapping through the ring for LMINF block tables (VLLM_NOTES B4).

A LMINF row has G + R columns, while a position p lives on logical page p // B, which grows
without bound. vLLM's slot-mapping kernel indexes the row with p // B and has no bounds
check: past the row it reads the next request's row, and past the last row it reads beyond
the buffer. The backend writes the cache with its own plan, but the kernel still runs every
step. This patch marks each LMINF group's BlockTable with (G, R) when the runner builds its
input batch, and computes that table's slot mapping through `rope_frame.table_slot` instead,
so vLLM's own slot mapping is correct too (and nothing reads out of bounds).
"""

from ._patch import Patch, carries_mark, mark_applied

NAME = "ring_slot_mapping"
TARGET = "vllm.v1.worker.block_table:BlockTable.compute_slot_mapping"
RUNNER_HOOK = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.may_reinitialize_input_batch"
RING_ATTR = "lminf_ring"


def ring_slot_mapping(block_table, num_reqs: int, query_start_loc, positions,
                      num_pinned_pages: int, num_ring_pages: int, page_size: int):
    """[num_tokens] int64 cache slots of `positions` for rows that are a ring of G + R pages.

    block_table: [max_num_reqs, G + R] physical block ids; query_start_loc: [num_reqs + 1]
    rows of each request's tokens; positions: [num_tokens] absolute positions.
    """
    import torch

    from lminf_vllm import rope_frame

    query_lens = (query_start_loc[1:num_reqs + 1] - query_start_loc[:num_reqs]).long()
    token_req = torch.repeat_interleave(
        torch.arange(num_reqs, device=positions.device), query_lens,
        output_size=positions.shape[0])
    column = rope_frame.table_slot(positions // page_size, num_pinned_pages, num_ring_pages)
    return (block_table[token_req, column].long() * page_size
            + rope_frame.key_frame_position(positions, page_size))


def _install() -> None:
    from vllm.v1.attention.backends.utils import PAD_SLOT_ID
    from vllm.v1.kv_cache_interface import KVCacheSpecKind, get_kv_cache_spec_kind
    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lminf_vllm.kv_cache import LMInfSpec

    compute_slot_mapping = BlockTable.compute_slot_mapping
    may_reinitialize_input_batch = GPUModelRunner.may_reinitialize_input_batch

    def compute_slot_mapping_ring(self, num_reqs, query_start_loc, positions):
        ring = getattr(self, RING_ATTR, None)
        if ring is None:
            return compute_slot_mapping(self, num_reqs, query_start_loc, positions)
        num_tokens = positions.shape[0]
        slots = self.slot_mapping.gpu
        slots[:num_tokens] = ring_slot_mapping(self.block_table.gpu, num_reqs,
                                               query_start_loc, positions, *ring,
                                               self.block_size)
        slots[num_tokens:].fill_(PAD_SLOT_ID)

    def may_reinitialize_input_batch_ring(self, kv_cache_config):
        may_reinitialize_input_batch(self, kv_cache_config)
        # The input batch's block tables follow the groups, encoder-only groups left out.
        specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups
                 if get_kv_cache_spec_kind(g.kv_cache_spec)
                 != KVCacheSpecKind.ENCODER_ONLY_ATTENTION]
        for table, spec in zip(self.input_batch.block_table.block_tables, specs):
            if isinstance(spec, LMInfSpec):
                setattr(table, RING_ATTR, (spec.num_pinned_pages, spec.num_ring_pages))

    BlockTable.compute_slot_mapping = mark_applied(compute_slot_mapping_ring, NAME)
    GPUModelRunner.may_reinitialize_input_batch = may_reinitialize_input_batch_ring


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("BlockTable.compute_slot_mapping maps positions through the ring for LMINF "
          "groups (G pinned columns, then (page - G) mod R); GPUModelRunner."
          "may_reinitialize_input_batch marks those groups' tables"),
    why=("vLLM indexes the row with position // B without a bounds check; a ring row of "
         "G + R columns makes it read other rows or past the buffer"),
    upstream="none: vLLM has no ring-addressed full-attention spec; V1 ignores "
             "KVCacheSpec.uses_slot_mapping (only the V2 runner honours it)",
    remove_when="the V1 runner skips the slot mapping for specs with uses_slot_mapping=False "
                "or asks the spec for its slot mapping",
    fingerprinted={TARGET: "1090515a52c58b28", RUNNER_HOOK: "2c784736af70e848"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
