"""Λ-attention on the paged cache vs the dense float64 oracle (DESIGN §2): the PyTorch
reference and the CPU serving path (cpu_attention's kernel, what `run` calls on the CPU).

Each case streams requests through the cache the way the engine does (history written in
chunks, possibly through a ring of pages), then runs one final mixed step (decodes and
prefill chunks together) and compares every query's output with the oracle. In the
per-request cases each request narrows n_global and n_local to its own values
(request_settings.py), and its oracle is the formula with those values.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import oracle
from lminf_vllm.attention import (QueryRotation, build_plan, cpu_attention, reference, run,
                                  write_kv)
from lminf_vllm.attention.plan import DEFAULT_TILE_QUERIES
from lminf_vllm.config import LMInfConfig

# float32 paged path vs float64: sums of a few hundred O(1) products in float32.
FLOAT32_ATOL = 3e-5


@dataclass
class Case:
    page_size: int
    n_global: int
    n_local: int
    trained_length: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    style: str
    history_chunk: int
    ring: bool
    requests: list  # (context length after the final step, queries in the final step)
    # per request (n_global, n_local) at most the engine's (above); empty: the engine's
    narrowed: list = field(default_factory=list)

    def settings(self, row: int) -> tuple[int, int]:
        return self.narrowed[row] if self.narrowed else (self.n_global, self.n_local)


CASES = {
    "defaults-decode-and-prefill": Case(16, 64, 256, 256, 6, 2, 64, 64, "neox", 64, False,
                                        [(300, 1), (37, 37), (16, 1), (290, 20)]),
    "tiny-pages-gptj-ring": Case(4, 5, 20, 24, 4, 4, 8, 8, "gptj", 7, True,
                                 [(90, 7), (3, 1), (61, 1)]),
    "exact-window-partial-rotary-ring": Case(16, 0, 241, 256, 8, 1, 32, 16, "neox", 64, True,
                                             [(700, 64), (255, 1)]),
    "window-of-one": Case(8, 16, 1, 32, 3, 1, 16, 16, "neox", 5, False, [(50, 5), (9, 1)]),
    "global-not-page-aligned-straddling-chunks": Case(16, 100, 64, 128, 4, 2, 32, 32, "gptj",
                                                      33, True, [(1000, 33), (17, 17)]),
    "prefill-tiles-longer-than-128": Case(16, 64, 200, 256, 2, 1, 16, 16, "neox", 300, False,
                                          [(500, 300)]),
    # 16 query heads per KV head: decode tiles big enough for the CPU kernel's GEMMs
    "wide-gqa-group-ring": Case(16, 16, 64, 128, 16, 1, 32, 32, "neox", 40, True,
                                [(300, 1), (100, 1), (120, 20)]),
    # tiles of 64 queries exceed L - B + 2 = 26: the per-page query rotation serves them
    "tiles-longer-than-l": Case(8, 8, 24, 32, 4, 2, 16, 16, "gptj", 64, True, [(200, 64)]),
    # one batch, each request its own values: none pinned, a window of one, values off the
    # page grid, the engine's own, and one stream twice with different values
    "per-request-mixed-ring": Case(16, 64, 256, 256, 6, 2, 64, 64, "neox", 64, True,
                                   [(300, 1), (37, 37), (290, 20), (700, 64), (16, 1),
                                    (300, 1)],
                                   narrowed=[(0, 241), (64, 256), (20, 100), (33, 1), (5, 16),
                                             (64, 256)]),
    "per-request-tiny-pages-gptj": Case(4, 5, 20, 24, 4, 4, 8, 8, "gptj", 7, True,
                                        [(90, 7), (3, 1), (61, 1), (90, 7)],
                                        narrowed=[(5, 20), (2, 9), (0, 3), (1, 13)]),
}


def rotation_table(case: Case, inv_freq: torch.Tensor) -> QueryRotation:
    angles = torch.arange(case.trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    return QueryRotation.from_model_table(torch.cat([angles.cos(), angles.sin()], 1).float(),
                                          case.trained_length + 1, case.style == "neox")


# Every path that computes attention on the CPU, as run(plan, q, cache, out, rotation, scale).
PATHS = {"reference": reference.attend, "cpu": run, "cpu-chunk-tiles": run}
# Queries per plan tile where a path is not tested with the planner's default: the CPU
# kernel serves a whole chunk per tile in the engine (cpu_attention.tile_queries).
TILE_QUERIES = {"cpu-chunk-tiles": cpu_attention.tile_queries}


def step(config, cache, block_table, ring_pages, batch, *, attend, rotation=None, scale=1.0,
         tile_queries=DEFAULT_TILE_QUERIES, tail_start=None, settings=None):
    """One engine step. batch: [(request row, context after step, q, k, v for its queries)];
    tail_start: per batch entry, as StepPlanner.plan; settings(row) -> that request's
    (n_global, n_local), or None for the engine's."""
    rows = [b[0] for b in batch]
    query_lens = [len(b[2]) for b in batch]
    n_global, n_local = (np.array([settings(row) for row in rows]).T if settings
                         else (None, None))
    plan = build_plan(config, np.concatenate([[0], np.cumsum(query_lens)]),
                      np.array([b[1] for b in batch]), block_table[rows], ring_pages,
                      tile_queries=tile_queries, tail_start=tail_start,
                      n_global=n_global, n_local=n_local)
    cat = lambda i: torch.cat([b[i] for b in batch]).float()
    write_kv(plan, cat(3), cat(4), cache)
    if attend:
        output = torch.zeros_like(cat(2))
        attend(plan, cat(2), cache, output, rotation, scale)
        return output.split(query_lens)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_paths_match_the_float64_oracle(name, path):
    case = CASES[name]
    torch.manual_seed(hash(name) % 2**31)
    final_chunk = max(q for _, q in case.requests)
    config = LMInfConfig(case.n_global, case.n_local, case.trained_length, case.page_size,
                         max(case.history_chunk, final_chunk))
    ring_pages = config.num_ring_pages if case.ring else None
    max_context = max(s for s, _ in case.requests)
    width = (config.num_pinned_pages + ring_pages if case.ring
             else -(-max_context // case.page_size))
    num_blocks = width * len(case.requests) + 3
    # Rows hold distinct physical pages in a shuffled order, as a block pool would give.
    block_table = torch.randperm(num_blocks)[: width * len(case.requests)].view(
        len(case.requests), width)
    cache = torch.full((num_blocks, case.num_kv_heads, case.page_size, 2 * case.head_dim),
                       float("nan"))  # unwritten slots must never be read
    inv_freq = oracle.default_inv_freq(case.rotary_dim)
    frame = lambda x, pos: oracle.rope_rotate(x, (pos % case.page_size)[:, None], inv_freq,
                                              case.style)

    streams = []
    for row, (context, final) in enumerate(case.requests):
        q = torch.randn(context, case.num_heads, case.head_dim, dtype=torch.float64)
        k = torch.randn(context, case.num_kv_heads, case.head_dim, dtype=torch.float64)
        v = torch.randn(context, case.num_kv_heads, case.head_dim, dtype=torch.float64)
        streams.append((q, k, v))
        pos = torch.arange(context)
        for start in range(0, context - final, case.history_chunk):
            end = min(start + case.history_chunk, context - final)
            sl = slice(start, end)
            step(config, cache, block_table, ring_pages,
                 [(row, end, frame(q[sl], pos[sl]), frame(k[sl], pos[sl]), v[sl])],
                 attend=None)

    batch = []
    for row, ((context, final), (q, k, v)) in enumerate(zip(case.requests, streams)):
        sl = slice(context - final, context)
        pos = torch.arange(context)[sl]
        batch.append((row, context, frame(q[sl], pos), frame(k[sl], pos), v[sl]))
    scale = case.head_dim ** -0.5
    tiles = TILE_QUERIES.get(path, lambda config: DEFAULT_TILE_QUERIES)(config)
    outputs = step(config, cache, block_table, ring_pages, batch, attend=PATHS[path],
                   rotation=rotation_table(case, inv_freq), scale=scale, tile_queries=tiles,
                   settings=case.settings if case.narrowed else None)

    for row, ((context, final), (q, k, v), out) in enumerate(zip(case.requests, streams, outputs)):
        positions = torch.arange(context - final, context)
        n_global, n_local = case.settings(row)
        expected = oracle.lambda_attention(q[context - final:], k, v, positions, n_global,
                                           n_local, case.trained_length, case.page_size,
                                           inv_freq, case.style, scale=scale)
        error = (out.double() - expected).abs()
        worst = np.unravel_index(int(error.argmax()), error.shape)
        assert float(error.max()) < FLOAT32_ATOL, (
            f"request {row} (n_global={n_global}, n_local={n_local}): max error {float(error.max()):.2e} at query position "
            f"{int(positions[worst[0]])}, head {worst[1]} (page "
            f"{int(positions[worst[0]]) // case.page_size})")


@pytest.mark.parametrize("path", PATHS)
def test_lminf_equals_causal_attention_when_window_and_l_cover_the_stream(path):
    """Metamorphic: with n_local >= T and L >= T the Λ mask and the distance limit vanish."""
    torch.manual_seed(1)
    length, page_size, heads, head_dim = 96, 8, 2, 16
    config = LMInfConfig(0, 128, 128, page_size, length)
    inv_freq = oracle.default_inv_freq(head_dim)
    q, k, v = (torch.randn(length, heads, head_dim, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(length)
    cache = torch.zeros(length // page_size, heads, page_size, 2 * head_dim)
    block_table = torch.arange(length // page_size)[None]
    frame = lambda x: oracle.rope_rotate(x, (pos % page_size)[:, None], inv_freq).float()
    plan = build_plan(config, np.array([0, length]), np.array([length]), block_table)
    write_kv(plan, frame(k), v.float(), cache)
    out = torch.zeros(length, heads, head_dim)
    case = Case(page_size, 0, 128, 128, heads, heads, head_dim, head_dim, "neox", 1, False, [])
    PATHS[path](plan, frame(q), cache, out, rotation_table(case, inv_freq), head_dim ** -0.5)

    absolute = lambda x: oracle.rope_rotate(x, pos[:, None], inv_freq)
    causal = torch.nn.functional.scaled_dot_product_attention(
        absolute(q).transpose(0, 1), absolute(k).transpose(0, 1), v.transpose(0, 1),
        is_causal=True).transpose(0, 1)
    assert float((out.double() - causal).abs().max()) < FLOAT32_ATOL
