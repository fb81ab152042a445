"""AttentionPlan: per-step index tensors that every attention path reads.

Built once per engine step from vLLM's batch description (host-side query_start_loc and
seq_lens, device-side block table) and reused by every layer. The reference and the
kernels differ only in how they consume it.

The batch is cut into *tiles*: up to `tile_queries` consecutive queries of one request.
A decode request is a tile of one query. Each tile lists the logical pages its queries may
see (the global pages, then the local pages, DESIGN §2) and where they live in the cache.
Tiles of equal length form a group, so a group is a dense [N, T] block of queries with an
[N, P] block of pages (padding pages have base position -1 and are masked).

A request may narrow n_global and n_local (lminf_vllm/request_settings.py), so each tile
carries its own request's two values, and every path masks with those. What sizes memory
(the pinned pages, the ring, the page size, L) is the engine's config, which bounds every
request's values; so narrowing never changes a group's shape, and a decode batch keeps the
one fixed shape its CUDA graph was captured with whatever mix of settings it holds.

A StepPlanner owns the memory every plan lives in, allocated once: a host arena (pinned on
CUDA, two of them used in turn) where the step's indices are computed, and one device arena
they reach with a single non-blocking copy; block ids are then gathered from the block
table on the device. So planning a step never waits for the device, and a plan of the same
shape always has the same addresses (what a replayed CUDA graph reads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from lminf_vllm import rope_frame
from lminf_vllm.config import LMInfConfig

PADDING_PAGE_BASE = -1
# vLLM's block pool keeps block 0 (its null block) out of every request, and its CUDA-graph
# padding rows point there: padding tokens store their keys in it and padding tiles read it.
PADDING_BLOCK = 0
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
    n_global:        [N] int64, n_global of each tile's request (<= the engine's)
    n_local:         [N] int64, n_local of each tile's request (<= the engine's)
    """

    query_rows: torch.Tensor
    query_position: torch.Tensor
    page_block: torch.Tensor
    page_base: torch.Tensor
    n_global: torch.Tensor
    n_local: torch.Tensor

    def apply(self, fn) -> "TileGroup":
        """The group with fn applied to each of its tensors (a slice of tiles, a move)."""
        return TileGroup(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass(frozen=True)
class AttentionPlan:
    """Everything attention needs for one step, shared by all layers.

    slot_block:  [num_tokens] int64, block each new key and value goes to
    slot_offset: [num_tokens] int64, its offset in that block (j mod B)
    groups: the tile groups; every query row of the step appears in exactly one.
    """

    config: LMInfConfig
    slot_block: torch.Tensor
    slot_offset: torch.Tensor
    groups: tuple[TileGroup, ...]


def max_tile_pages(config: LMInfConfig, tile_queries):
    """The most pages a tile of up to `tile_queries` queries of one request may see (ints
    or an array of tile lengths).

    Its queries t0..t1 (t1 - t0 < T) see at most G global pages and the local pages of
    t0 - n_local + 1 .. t1: a span of n_local + T - 1 tokens, which touches the most pages,
    (span + B - 2) // B + 1, when it starts on the last slot of a page.
    """
    span = config.n_local + tile_queries - 1
    return config.num_pinned_pages + (span + config.page_size - 2) // config.page_size + 1


def decode_pages(config: LMInfConfig) -> int:
    """The fixed page width of a decode group: every decode tile fits, so shapes stay fixed
    from step to step (CUDA graphs)."""
    return max_tile_pages(config, 1)


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


def visible_pages(first_position: np.ndarray, last_position: np.ndarray, page_size: int,
                  n_global, n_local, min_width: int = 0,
                  tail_start: np.ndarray | None = None) -> np.ndarray:
    """[N, P] logical pages a tile of queries t0..t1 may see, padded with -1 to >= min_width.

    first_position, last_position: [N] t0 and t1 of each tile; n_global, n_local: ints, or
    [N] per tile. The global pages cover positions < n_global (up to t1), the local pages
    cover t0 - n_local + 1 .. t1; pages in both are listed once. tail_start: [N] the
    page-aligned start b of each tile's request's computed tail in receptive-field prefill,
    0 for none (receptive_field.tail_start); a tile at or past b lists no local page below
    it, since the prompt's keys there were skipped and their slots never written.
    """
    num_global = -(-np.minimum(n_global, last_position + 1) // page_size)
    window_start = np.maximum(first_position - n_local + 1, 0)
    if tail_start is not None:
        window_start = np.where(first_position >= tail_start,
                                np.maximum(window_start, tail_start), window_start)
    local_first = np.maximum(rope_frame.logical_page(window_start, page_size), num_global)
    local_last = rope_frame.logical_page(last_position, page_size)
    num_local = np.maximum(local_last - local_first + 1, 0)
    width = max(int((num_global + num_local).max(initial=0)), min_width)
    k = np.arange(width)[None, :]
    pages = np.where(k < num_global[:, None], k, local_first[:, None] + k - num_global[:, None])
    return np.where(k < (num_global + num_local)[:, None], pages, -1)


def padded_decode_requests(query_lens: np.ndarray, num_tokens: int) -> int:
    """How many trailing requests are CUDA-graph padding of a decode batch, else 0.

    vLLM pads a uniform decode batch it replays from a full CUDA graph with requests of no
    query after the real ones, and with as many padding tokens. Such a batch keeps one tile
    per request (row i for request i), so its plan has the shape the graph was captured with.
    """
    num_real = int(np.count_nonzero(query_lens))
    if (num_real == len(query_lens) or query_lens.max(initial=0) > 1
            or query_lens[:num_real].min(initial=1) < 1 or num_tokens < len(query_lens)):
        return 0
    return len(query_lens) - num_real


def per_request_values(name: str, values, engine_value: int, low: int,
                       num_reqs: int) -> np.ndarray:
    """[num_reqs] int64 of a per-request setting (the engine's value where None), refused
    outside [low, engine_value]: the pinned pages and the ring are sized by the engine's
    value, so a wider one would read pages the request does not hold."""
    if values is None:
        return np.full(num_reqs, engine_value, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)[:num_reqs]
    bad = (values < low) | (values > engine_value)
    if len(values) != num_reqs or bad.any():
        raise ValueError(f"lminf plan: per-request {name} must give [{low}, "
                         f"{engine_value}] for each of the {num_reqs} requests, got "
                         f"{values.tolist()}")
    return values


class _Arena:
    """A flat int64 buffer handed out in consecutive segments (start, size, shape)."""

    def __init__(self, host: torch.Tensor, host_numpy: np.ndarray):
        self.host = host
        self.numpy = host_numpy
        self.used = 0

    def put(self, values: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
        size = values.size
        if self.used + size > len(self.numpy):
            raise ValueError(f"lminf plan: the step needs more than the {len(self.numpy)} "
                             "index entries planned for (max_num_reqs / max_num_tokens)")
        self.numpy[self.used:self.used + size] = values.reshape(-1)
        start, self.used = self.used, self.used + size
        return start, size, values.shape


class StepPlanner:
    """Plans steps into memory allocated once (sized by the batch limits and the window).

    max_num_reqs, max_num_tokens: the most requests and query tokens of one step
    num_ring_pages:  R when block-table rows are rings of G + R pages, None for plain rows
    tile_queries:    queries per tile (a path may prefer its own tile height)
    min_pages:       pad every group to at least this many pages (decode_pages(config) keeps
                     decode shapes fixed for CUDA graphs)
    """

    def __init__(self, config: LMInfConfig, *, max_num_reqs: int, max_num_tokens: int,
                 device: torch.device, num_ring_pages: int | None = None,
                 tile_queries: int = DEFAULT_TILE_QUERIES, min_pages: int = 0) -> None:
        self.config = config
        self.num_ring_pages = num_ring_pages
        self.tile_queries = tile_queries
        self.min_pages = min_pages
        self.device = torch.device(device)
        tile_pages = max(min_pages, max_tile_pages(
            config, min(tile_queries, config.max_prefill_chunk_tokens)))
        max_tiles = max_num_reqs + -(-max_num_tokens // tile_queries)
        # per token: block index, offset, query row, position; per tile page: index, base;
        # per tile: n_global, n_local
        self.capacity = 4 * max_num_tokens + 2 * max_tiles * (tile_pages + 1)
        on_cuda = self.device.type == "cuda"
        # Two host arenas in turn: the host fills one while the device may still be
        # copying the other; each waits only for its own copy of two steps ago.
        self._hosts = [torch.empty(self.capacity, dtype=torch.int64, pin_memory=on_cuda)
                       for _ in range(2 if on_cuda else 1)]
        self._host_numpy = [host.numpy() for host in self._hosts]
        self._copied = [None] * len(self._hosts)
        self._turn = 0
        # On the CPU the host arena is the device arena: no copy at all.
        self.arena = (torch.empty(self.capacity, dtype=torch.int64, device=self.device)
                      if on_cuda else self._hosts[0])
        self.blocks = torch.empty(self.capacity, dtype=torch.int64, device=self.device)

    def plan(self, query_start_loc: np.ndarray, seq_lens: np.ndarray,
             block_table: torch.Tensor, num_tokens: int | None = None,
             tail_start: np.ndarray | None = None, n_global: np.ndarray | None = None,
             n_local: np.ndarray | None = None) -> AttentionPlan:
        """Plan one step; the plan's tensors are views of this planner's arenas, valid until
        the next call.

        query_start_loc: [num_reqs + 1] host ints, query rows of each request
        seq_lens:        [num_reqs] host ints, context length after this step (rows of
                         requests without queries may be missing or anything)
        block_table:     [num_reqs, width] physical block ids (vLLM's block table)
        num_tokens:      rows of the step's key tensor (>= query_start_loc[-1]); the rows past
                         the requests' queries are padding, stored into PADDING_BLOCK
        tail_start:      [num_reqs] host ints, each request's receptive-field tail start or
                         0 (visible_pages); None when nothing is skipped
        n_global, n_local: [num_reqs] host ints, each request's own values (at most the
                         config's; request_settings.py checks them), or None for the config's
        """
        config, page_size = self.config, self.config.page_size
        query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
        query_lens = np.diff(query_start_loc)
        num_reqs = len(query_lens)
        num_queries = int(query_start_loc[-1])
        num_tokens = num_queries if num_tokens is None else num_tokens
        seq_lens = np.asarray(seq_lens, dtype=np.int64)[:num_reqs]
        seq_lens = np.concatenate([seq_lens, np.zeros(num_reqs - len(seq_lens), np.int64)])
        too_long = query_lens > config.max_prefill_chunk_tokens
        if too_long.any():
            req = int(np.argmax(too_long))
            raise ValueError(
                f"lminf plan: request {req} has {int(query_lens[req])} queries in one step, "
                f"more than max_prefill_chunk_tokens={config.max_prefill_chunk_tokens}: its "
                "keys would overwrite ring pages its own queries still read")
        width = block_table.shape[1]
        n_global = per_request_values("n_global", n_global, config.n_global, 0, num_reqs)
        n_local = per_request_values("n_local", n_local, config.n_local, 1, num_reqs)

        def table_index(req: np.ndarray, page: np.ndarray) -> np.ndarray:
            """Flat index of (request, logical page) into the row-major block table."""
            column = rope_frame.table_slot(page, config.num_pinned_pages, self.num_ring_pages)
            return req * width + column

        # Keys of padding tokens go to PADDING_BLOCK (index -1), at offset 0.
        token_req = np.repeat(np.arange(num_reqs), query_lens)
        token_position = (np.repeat(seq_lens - query_lens, query_lens)
                          + np.arange(num_queries) - np.repeat(query_start_loc[:-1], query_lens))
        num_padding_tokens = num_tokens - num_queries
        slot_index = np.concatenate([
            table_index(token_req, rope_frame.logical_page(token_position, page_size)),
            np.full(num_padding_tokens, -1)])
        slot_offset = np.concatenate([rope_frame.key_frame_position(token_position, page_size),
                                      np.zeros(num_padding_tokens, np.int64)])

        tile_req, first_row, first_position, length = _tiles(query_start_loc, seq_lens,
                                                             self.tile_queries)
        num_padding_reqs = padded_decode_requests(query_lens, num_tokens)
        if num_padding_reqs:
            # One tile per padding request, at its own padding-token row and position 0,
            # whose first page is PADDING_BLOCK: finite, and never a real request's page.
            padding_req = np.arange(num_reqs - num_padding_reqs, num_reqs)
            tile_req = np.concatenate([tile_req, padding_req])
            first_row = np.concatenate([first_row, padding_req])
            first_position = np.concatenate([first_position, np.zeros_like(padding_req)])
            length = np.concatenate([length, np.ones_like(padding_req)])
        page_index, direct = [], []
        for tile_len in np.unique(length):
            sel = np.nonzero(length == tile_len)[0]
            pages = visible_pages(first_position[sel], first_position[sel] + tile_len - 1,
                                  page_size, n_global[tile_req[sel]],
                                  n_local[tile_req[sel]], self.min_pages,
                                  None if tail_start is None else tail_start[tile_req[sel]])
            padding = pages < 0
            index = table_index(tile_req[sel][:, None], np.where(padding, 0, pages))
            index[query_lens[tile_req[sel]] == 0] = -1
            steps = np.arange(tile_len)[None, :]
            page_index.append(index)
            direct.append((first_row[sel][:, None] + steps, first_position[sel][:, None] + steps,
                           np.where(padding, PADDING_PAGE_BASE,
                                    rope_frame.page_base(pages, page_size)),
                           n_global[tile_req[sel]], n_local[tile_req[sel]]))

        # Layout: every block-table index first (gathered on the device in one pass), then
        # the values used as they are.
        arena = self._next_host_arena()
        index_segments = [arena.put(x) for x in [slot_index] + page_index]
        offset_segment = arena.put(slot_offset)
        direct_segments = [tuple(arena.put(x) for x in arrays) for arrays in direct]
        device_arena = self._to_device(arena)
        self._gather_blocks(device_arena, block_table, index_segments[-1])

        def view(segment, buffer=device_arena):
            start, size, shape = segment
            return buffer[start:start + size].view(shape)

        return AttentionPlan(
            config=config,
            slot_block=view(index_segments[0], self.blocks),
            slot_offset=view(offset_segment),
            groups=tuple(TileGroup(query_rows=view(rows), query_position=view(position),
                                   page_block=view(index, self.blocks), page_base=view(base),
                                   n_global=view(tile_n_global), n_local=view(tile_n_local))
                         for index, (rows, position, base, tile_n_global, tile_n_local)
                         in zip(index_segments[1:], direct_segments)))

    def _next_host_arena(self) -> _Arena:
        self._turn = (self._turn + 1) % len(self._hosts)
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # its copy of two steps ago, long done
        return _Arena(self._hosts[self._turn], self._host_numpy[self._turn])

    def _to_device(self, arena: _Arena) -> torch.Tensor:
        if self.arena is arena.host:
            return self.arena
        self.arena[:arena.used].copy_(arena.host[:arena.used], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event
        return self.arena

    def _gather_blocks(self, device_arena: torch.Tensor, block_table: torch.Tensor,
                       last_segment) -> None:
        """blocks[i] = block_table.flat[arena[i]] over the index segments (which start the
        arena), PADDING_BLOCK where the index is -1; in place, so self.blocks keeps the
        arena's offsets."""
        stop = last_segment[0] + last_segment[1]
        index = device_arena[:stop]
        blocks = self.blocks[:stop]
        blocks.copy_(block_table.reshape(-1)[index.clamp(min=0)])
        blocks.masked_fill_(index < 0, PADDING_BLOCK)


def build_plan(config: LMInfConfig, query_start_loc: np.ndarray, seq_lens: np.ndarray,
               block_table: torch.Tensor, num_ring_pages: int | None = None,
               tile_queries: int = DEFAULT_TILE_QUERIES, min_pages: int = 0,
               num_tokens: int | None = None, tail_start: np.ndarray | None = None,
               n_global: np.ndarray | None = None,
               n_local: np.ndarray | None = None) -> AttentionPlan:
    """Plan one step in memory of its own (tests, benchmarks; the backend keeps a
    StepPlanner). Arguments as StepPlanner and StepPlanner.plan."""
    query_start_loc = np.asarray(query_start_loc, dtype=np.int64)
    num_queries = int(query_start_loc[-1])
    planner = StepPlanner(config, max_num_reqs=len(query_start_loc) - 1,
                          max_num_tokens=max(num_queries, num_tokens or 0),
                          device=block_table.device, num_ring_pages=num_ring_pages,
                          tile_queries=tile_queries, min_pages=min_pages)
    return planner.plan(query_start_loc, seq_lens, block_table, num_tokens, tail_start,
                        n_global, n_local)

