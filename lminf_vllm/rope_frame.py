"""Pure index math of the page-local key frame (DESIGN §2-3). No vLLM import.

Every function works elementwise on Python ints or integer tensors (torch or numpy), so the
planner, the reference attention, the tests and the kernels' launchers share one definition.
"""

from __future__ import annotations

import numpy as np
import torch


def _minimum(a, b):
    """Elementwise min of ints, numpy arrays or torch tensors (keeping tensor devices)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.minimum(a, b)
    if isinstance(a, torch.Tensor):
        return a.clamp(max=b)
    if isinstance(b, torch.Tensor):
        return b.clamp(max=a)
    return np.minimum(a, b)


def logical_page(position, page_size: int):
    """Index of the page (vLLM block) holding absolute position `position`."""
    return position // page_size


def page_base(page, page_size: int):
    """Absolute position of the first token of logical page `page` (b_p in DESIGN §3)."""
    return page * page_size


def key_frame_position(position, page_size: int):
    """The position a key is rotated by when stored: its offset in its page, j mod B.

    The model's rotary embedding is fed this instead of the absolute position, so nothing
    large ever reaches the cos/sin table (DESIGN §3).
    """
    return position % page_size


def ring_slot(page, num_pinned_pages: int, num_ring_pages: int):
    """Ring index of a non-pinned logical page: (i - G) mod R."""
    return (page - num_pinned_pages) % num_ring_pages


def table_slot(page, num_pinned_pages: int, num_ring_pages: int | None):
    """Block-table column of logical page i: i for i < G, else G + ((i - G) mod R).

    num_ring_pages=None means the row is not a ring (one column per page of the stream).
    """
    if num_ring_pages is None:
        return page
    ring = num_pinned_pages + ring_slot(page, num_pinned_pages, num_ring_pages)
    if isinstance(page, torch.Tensor):
        return torch.where(page < num_pinned_pages, page, ring)
    if isinstance(page, np.ndarray):
        return np.where(page < num_pinned_pages, page, ring)
    return page if page < num_pinned_pages else ring


def distance(query_position, key_position, page_size: int, trained_length: int):
    """The relative distance RoPE sees: min(t - j, L - (j mod B))  (DESIGN §2)."""
    return _minimum(query_position - key_position,
                    trained_length - key_position % page_size)


def visible(query_position, key_position, n_global, n_local):
    """The Λ mask: j < n_global or t - j < n_local, with j <= t  (DESIGN §2).

    n_global, n_local: ints, or arrays broadcast against the positions (per request)."""
    causal = key_position <= query_position
    return causal & ((key_position < n_global) | (query_position - key_position < n_local))


def query_angle(query_position, page_base_position, page_size: int, trained_length: int):
    """Extra rotation of a query for the keys of one page: min(t - b_p, L) - (t mod B).

    Keys of page p are stored rotated by o = j mod B and the query arrives rotated by
    t mod B, so rotating it by this angle more makes every logit see
    min(t - b_p, L) - o = min(t - j, L - o) = distance(t, j) for each key of the page
    (DESIGN §3). The angle lies in [-(B - 1), L], so a table of L + 1 rows covers it.
    """
    return (_minimum(query_position - page_base_position, trained_length)
            - query_position % page_size)
