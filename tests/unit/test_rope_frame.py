"""rope_frame: exhaustive checks on small B and L against the DESIGN §2-3 definitions."""

import itertools

import numpy as np
import pytest
import torch

from lminf_vllm import rope_frame


@pytest.mark.parametrize("page_size,trained_length", [(1, 1), (4, 6), (4, 8), (16, 256), (5, 17)])
def test_query_angle_gives_the_distance_of_every_key_of_the_page(page_size, trained_length):
    # rotation seen by a key = query frame (t mod B) + angle - key frame (j mod B)
    for t in range(3 * trained_length):
        for j in range(t + 1):
            base = rope_frame.page_base(rope_frame.logical_page(j, page_size), page_size)
            angle = rope_frame.query_angle(t, base, page_size, trained_length)
            seen = (rope_frame.key_frame_position(t, page_size) + angle
                    - rope_frame.key_frame_position(j, page_size))
            assert seen == min(t - j, trained_length - j % page_size), (t, j)
            assert -(page_size - 1) <= angle <= trained_length


def test_distance_is_exact_inside_the_window_when_n_local_fits():
    page_size, trained_length = 16, 64
    n_local = trained_length - page_size + 1
    for t, j in itertools.product(range(200), repeat=2):
        if j <= t and t - j < n_local:
            assert rope_frame.distance(t, j, page_size, trained_length) == t - j


def test_distance_never_exceeds_l():
    t = torch.arange(10_000)[:, None]
    j = torch.arange(0, 10_000, 37)[None, :]
    d = rope_frame.distance(t, j, 16, 256)
    assert int(d[j.expand_as(d) <= t].max()) <= 256


@pytest.mark.parametrize("pinned,ring", [(0, 3), (2, 5), (4, 1)])
def test_table_slot_pins_the_prefix_and_cycles_the_ring(pinned, ring):
    pages = np.arange(pinned + 4 * ring)
    slots = rope_frame.table_slot(pages, pinned, ring)
    assert list(slots[:pinned]) == list(range(pinned))
    assert set(slots[pinned:]) == set(range(pinned, pinned + ring))
    # consecutive ring pages land in consecutive slots, modulo R
    assert all((b - a) % ring == 1 % ring for a, b in zip(slots[pinned:], slots[pinned + 1:]))
    torch_slots = rope_frame.table_slot(torch.from_numpy(pages), pinned, ring)
    assert torch_slots.tolist() == list(slots)
    assert rope_frame.table_slot(7, pinned, None) == 7


def test_visible_is_the_lambda_mask():
    t = torch.arange(40)[:, None]
    j = torch.arange(40)[None, :]
    mask = rope_frame.visible(t, j, n_global=3, n_local=5)
    for a, b in itertools.product(range(40), repeat=2):
        assert bool(mask[a, b]) == (b <= a and (b < 3 or a - b < 5))


def test_large_positions_stay_exact_in_int64():
    t = torch.tensor([199_999_999])
    assert int(rope_frame.query_angle(t, torch.tensor([199_999_984]), 16, 256)) == 15 - 15
    assert int(rope_frame.query_angle(t, torch.tensor([0]), 16, 256)) == 256 - 15
