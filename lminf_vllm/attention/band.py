"""The dense band of a prefill tile: the keys every row of a row block sees at exact distance.

For a row block of `rows` consecutive queries t0..t1 of one tile, the window keys j with

    max(t1 - n_local + 1, page_ceil(t1 - L), window_base) <= j <= t0

are visible to every row (causal and inside each row's window) and exact for every row
(their page base is >= t1 - L). Together they are a plain rectangle of RoPE attention over the
dense turned copy of the tile's keys (triton_prefill.turn_pages), which a fused attention
library runs faster than our Triton loop: triton_prefill hands it to cuDNN and computes only
the rest (global pages, the oldest capped pages, the window's edge and the diagonal), starting
from the band's output and log-sum-exp.

The band's width W = t0 - lo + 1 is the same for every row block once the window is full
(lo moves with t1), so the band row blocks of a tile are a suffix of its full row blocks,
one batch of equal-length attention problems over an overlapping strided view of the copy.
Pure numpy on host positions: no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lminf_vllm.config import LMInfConfig

# A band narrower than this is left to the Triton loop (not worth a library call).
MIN_BAND_WIDTH = 256


@dataclass(frozen=True)
class Band:
    """Per tile n: row blocks first[n] .. end[n] - 1 are in the band, each seeing the width[n]
    keys t0 - width + 1 .. t0 at dense slots from first_slot[n] (+ rows per row block)."""

    first: np.ndarray        # [N] int64
    end: np.ndarray          # [N] int64 (first == end: no band)
    width: np.ndarray        # [N] int64
    first_slot: np.ndarray   # [N] int64, dense slot of the first band block's first key
    offset: np.ndarray       # [N] int64, index of the tile's first band block in the batch

    @property
    def num_blocks(self) -> int:
        return int((self.end - self.first).sum())


def ceil_to(x: np.ndarray, multiple: int) -> np.ndarray:
    return -(-x // multiple) * multiple


def band_geometry(config: LMInfConfig, first_position: np.ndarray, num_queries: int,
                  rows: int) -> Band:
    """The band of every tile of a group (tiles of num_queries queries, row blocks of rows)."""
    page_size = config.page_size
    first_position = np.asarray(first_position, dtype=np.int64)
    num_tiles = len(first_position)
    full = num_queries // rows if rows % page_size == 0 else 0
    tile_last = first_position + num_queries - 1
    # the page list's layout (plan.visible_pages): global pages, then window pages
    global_keys = ceil_to(np.minimum(config.n_global, tile_last + 1), page_size)
    window_base = np.maximum(
        (np.maximum(first_position - config.n_local + 1, 0) // page_size) * page_size,
        global_keys)
    t0 = first_position[:, None] + rows * np.arange(full)[None, :]
    t1 = t0 + rows - 1
    lo = np.maximum(np.maximum(t1 - config.n_local + 1,
                               ceil_to(np.maximum(t1 - config.trained_length, 0), page_size)),
                    window_base[:, None])
    width = t0 - lo + 1                                                   # [N, full]
    last_width = width[:, -1] if full else np.zeros(num_tiles, dtype=np.int64)
    in_band = (width == last_width[:, None]) & (last_width[:, None] >= MIN_BAND_WIDTH)
    # the band is a suffix of the full row blocks (width grows, then stays)
    trailing = np.flip(np.cumprod(np.flip(in_band, axis=1), axis=1), axis=1).sum(axis=1)
    first = full - trailing
    first_lo = first_position + rows * first - last_width + 1
    return Band(first=first, end=np.full(num_tiles, full, dtype=np.int64),
                width=np.where(trailing > 0, last_width, 0),
                first_slot=global_keys + (first_lo - window_base),
                offset=np.cumsum(trailing) - trailing)
