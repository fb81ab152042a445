"""band_geometry against brute force: every band key is visible to every row of its row block,
at exact distance, in the tile's window pages; the band is the suffix of full row blocks."""

import numpy as np
import pytest

from lminf_vllm import rope_frame
from lminf_vllm.attention import band
from lminf_vllm.attention.plan import visible_pages
from lminf_vllm.config import LMInfConfig


@pytest.mark.parametrize("page_size,trained_length,n_global,n_local,rows,tile", [
    (16, 256, 64, 256, 32, 300),      # n_local = L: the oldest pages are capped for some rows
    (16, 256, 20, 241, 64, 640),      # n_local = L - B + 1: every window distance exact
    (8, 64, 0, 40, 16, 100),
    (32, 512, 100, 300, 64, 1000),    # n_global not a page multiple
])
def test_band_keys_are_seen_whole_and_exact(page_size, trained_length, n_global, n_local,
                                            rows, tile, monkeypatch):
    monkeypatch.setattr(band, "MIN_BAND_WIDTH", 1)
    config = LMInfConfig(n_global=n_global, n_local=n_local, trained_length=trained_length,
                         page_size=page_size, max_prefill_chunk_tokens=tile)
    first = np.array([0, 5, n_local - 3, 3 * trained_length + 7, 200_000_000 - tile])
    geometry = band.band_geometry(config, first, tile, rows)
    pages = visible_pages(first, first + tile - 1, config)
    full = tile // rows
    assert geometry.num_blocks > 0
    for n, f in enumerate(first):
        assert geometry.end[n] == full and 0 <= geometry.first[n] <= full
        slots = {}   # dense slot -> key position, in the tile's page list order
        for index, page in enumerate(pages[n]):
            if page >= 0:
                for offset in range(page_size):
                    slots[index * page_size + offset] = page * page_size + offset
        window_start = (max(f - n_local + 1, 0) // page_size) * page_size
        for k, rb in enumerate(range(geometry.first[n], geometry.end[n])):
            t = f + rb * rows + np.arange(rows)
            width = geometry.width[n]
            keys = np.arange(t[0] - width + 1, t[0] + 1)
            assert width >= 1 and keys[0] >= max(window_start, 0)
            visible = rope_frame.visible(t[:, None], keys[None, :], n_global, n_local)
            assert visible.all()
            assert (keys >= min(-(-n_global // page_size) * page_size, f + tile)).all()
            page_base = keys - keys % page_size
            assert (t[-1] - page_base <= trained_length).all()
            # the dense slots the kernel and the library read hold exactly these keys
            slot0 = geometry.first_slot[n] + k * rows
            assert [slots[s] for s in range(slot0, slot0 + width)] == keys.tolist()
        # a row block before the band would need keys below the window's first page
        global_keys = -(-min(n_global, f + tile) // page_size) * page_size
        window_base = min((p * page_size for p in pages[n] if p * page_size >= global_keys),
                          default=None)
        for rb in range(geometry.first[n]):
            lo = f + rb * rows - geometry.width[n] + 1
            assert window_base is None or lo < window_base
