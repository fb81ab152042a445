"""AttentionPlan: per-step index tensors that every attention path reads.

Built once per engine step from vLLM's batch description (host-side query_start_loc and
seq_lens, device-side block table) and reused by every layer. The reference and the
kernels differ only in how they consume it.

The batch is cut into *tiles*: up to `tile_queries` consecutive queries of one request.
A decode request is a tile of one query. Each tile lists the logical pages its queries may
see (the global pages, then the local pages, DESIGN §2) and where they live in the cache.
Tiles of equal length form a group, so a group is a dense [N, T] block of queries with an
[N, P] block of pages (padding pages have base position -1 and are masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lminf_vllm import rope_frame
from lminf_vllm.config import LMInfConfig

PADDING_PAGE_BASE = -1
# Queries per prefill tile of the reference path: the tile's page set spans
# n_local + tile tokens, so 128 wastes at most (n_local + 128) / n_local of the logits on
# masked keys while keeping the [T, P, H, D] rotated-query tensor small.
DEFAULT_TILE_QUERIES = 128


@dataclass(frozen=True)
class TileGroup:
    """N tiles of T queries each, and the P pages each tile may attend to.

    query_rows:      [N, T] int64, rows of the step's flat query tensor
    query_position:  [N, T] int64, absolute positions t of those queries
    page_block:      [N, P] int64, physical block (page) ids in the KV cache
    page_base:       [N, P] int64, absolute position of each page's first token (b_p),
                     or -1 for padding
    """

    query_rows: torch.Tensor
    query_position: torch.Tensor
    page_block: torch.Tensor
    page_base: torch.Tensor


@dataclass(frozen=True)
class AttentionPlan:
    """Everything attention needs for one step, shared by all layers.

    slot_mapping: [num_tokens] int64, cache slot (block * B + offset) each new key goes to.
    groups: the tile groups; every query row of the step appears in exactly one.
    """

    config: LMInfConfig
    slot_mapping: torch.Tensor
    groups: tuple[TileGroup, ...]


def _tiles(query_start_loc: np.ndarray, seq_lens: np.ndarray, tile_queries: int):
    """Per tile: request index, first query row, first query position, number of queries."""
    query_lens = np.diff(query_start_loc)
    tiles_per_req = -(-query_lens // tile_queries)
    tile_req = np.repeat(np.arange(len(query_lens)), tiles_per_req)
    tile_index = np.arange(len(tile_req)) - np.repeat(np.cumsum(tiles_per_req) - tiles_per_req,
                                                      tiles_per_req)
    offset = tile_index * tile_queries
    first_row = query_start_loc[tile_req] + offset
    first_position = (seq_lens - query_lens)[tile_req] + offset
    length = np.minimum(tile_queries, query_lens[tile_req] - offset)
    return tile_req, first_row, first_position, length


def visible_pages(first_position: np.ndarray, last_position: np.ndarray,
                  config: LMInfConfig, min_width: int = 0) -> np.ndarray:
    """[N, P] logical pages a tile of queries t0..t1 may see, padded with -1 to >= min_width.

    The global pages cover positions < n_global (up to t1), the local pages cover
    t0 - n_local + 1 .. t1; pages in both are listed once.
    """
    page_size = config.page_size
    num_global = -(-np.minimum(config.n_global, last_position + 1) // page_size)
    window_start = np.maximum(first_position - config.n_local + 1, 0)
    local_first = np.maximum(rope_frame.logical_page(window_start, page_size), num_global)
    local_last = rope_frame.logical_page(last_position, page_size)
    num_local = np.maximum(local_last - local_first + 1, 0)
    width = max(int((num_global + num_local).max(initial=0)), min_width)
    k = np.arange(width)[None, :]
    pages = np.where(k < num_global[:, None], k, local_first[:, None] + k - num_global[:, None])
    return np.where(k < (num_global + num_local)[:, None], pages, -1)


def build_plan(config: LMInfConfig, query_start_loc: np.ndarray, seq_lens: np.ndarray,
               block_table: torch.Tensor, num_ring_pages: int | None = None,
               tile_queries: int = DEFAULT_TILE_QUERIES, min_pages: int = 0) -> AttentionPlan:
    """Plan one step.

    query_start_loc: [num_reqs + 1] host ints, query rows of each request
    seq_lens:        [num_reqs] host ints, context length after this step
    block_table:     [num_reqs, width] physical block ids (vLLM's block table), any device
    num_ring_pages:  R when the row is a ring of G + R pages, None for a plain row
    tile_queries:    queries per tile (a path may prefer its own tile height)
    min_pages:       pad every group to at least this many pages, so that shapes stay fixed
                     from step to step (CUDA graphs)
    """
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    device = block_table.device
    page_size = config.page_size

    def to_block(req: np.ndarray, page: np.ndarray) -> torch.Tensor:
        column = rope_frame.table_slot(page, config.num_pinned_pages, num_ring_pages)
        req_t = torch.from_numpy(np.ascontiguousarray(req, dtype=np.int64)).to(device)
        col_t = torch.from_numpy(np.asarray(column, dtype=np.int64)).to(device)
        return block_table[req_t, col_t].long()

    query_lens = np.diff(query_start_loc)
    token_req = np.repeat(np.arange(len(query_lens)), query_lens)
    token_position = (np.repeat(seq_lens - query_lens, query_lens)
                      + np.arange(len(token_req)) - np.repeat(query_start_loc[:-1], query_lens))
    slot_mapping = (to_block(token_req, rope_frame.logical_page(token_position, page_size))
                    * page_size
                    + torch.from_numpy(rope_frame.key_frame_position(token_position, page_size)
                                       ).to(device))

    tile_req, first_row, first_position, length = _tiles(query_start_loc, seq_lens,
                                                         tile_queries)
    groups = []
    for tile_len in np.unique(length):
        sel = np.nonzero(length == tile_len)[0]
        steps = np.arange(tile_len)[None, :]
        pages = visible_pages(first_position[sel], first_position[sel] + tile_len - 1, config,
                              min_pages)
        padding = pages < 0
        req_grid = np.repeat(tile_req[sel][:, None], pages.shape[1], axis=1)
        block = to_block(req_grid.reshape(-1), np.where(padding, 0, pages).reshape(-1))
        groups.append(TileGroup(
            query_rows=torch.from_numpy(first_row[sel][:, None] + steps).to(device),
            query_position=torch.from_numpy(first_position[sel][:, None] + steps).to(device),
            page_block=block.view(pages.shape),
            page_base=torch.from_numpy(np.where(padding, PADDING_PAGE_BASE,
                                                rope_frame.page_base(pages, page_size))
                                       ).to(device),
        ))
    return AttentionPlan(config=config, slot_mapping=slot_mapping, groups=tuple(groups))
