"""GPU: decode steps replayed from one captured CUDA graph equal eager steps, across ring wraps.

The objects are the backend's own (lminf_vllm.backend.LMInfMetadataBuilder on CUDA with full
graphs): a StepPlanner with decode_pages(config) pages per decode tile, which plans every
step into the same arenas, and attention.write_kv + attention.run (the Triton kernels). The
batch is shaped the way vLLM replays a full decode graph: three real requests and one
padding request (no query, block-table row of zeros, one padding token), captured at size 4.
Every step is planned again on the host; the graph reads the plan at the addresses it was
captured with. One eager mixed step (a 16-query chunk for request 0) in the middle of the
stream overwrites the arenas with a plan of another shape before replays resume.

400 steps > the ring's R * B = 336 tokens, so every request's ring wraps. Outputs and the
cache must be bit-identical to the eager run (same kernels, same inputs, same order).
No vLLM import: this runs on the GPU machine, which has torch but no vLLM.
"""

import numpy as np
import pytest
import torch

from lminf_vllm import attention
from lminf_vllm.attention import (StepPlanner, decode_pages, plan_tile_queries,
                                  rotation_for)
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = LMInfConfig(n_global=64, n_local=256, trained_length=256, page_size=16,
                     max_prefill_chunk_tokens=64)
WIDTH = CONFIG.num_pinned_pages + CONFIG.num_ring_pages
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 64
START = np.array([300, 600, 17])        # contexts of the real requests before the stream
STEPS = 400
MIXED_STEP = 150                       # an eager chunk of 16 queries for request 0
MIXED_QUERIES = 16
GRAPH_REQUESTS = 4                     # three real, one padding


def rope_table(device):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angle = torch.arange(CONFIG.trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    table = torch.cat([angle.cos(), angle.sin()], dim=1).float().contiguous()
    return rotation_for(QueryRotation(table, HEAD_DIM, True), CONFIG, device)


class Stream:
    """The batch of every step: its host description and its device inputs."""

    def __init__(self, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        num_real = len(START)
        self.table = torch.zeros(GRAPH_REQUESTS, WIDTH, dtype=torch.int32)
        self.table[:num_real] = 1 + torch.randperm(num_real * WIDTH, generator=g).view(
            num_real, WIDTH).int()          # block 0 is the padding block: nobody owns it
        self.table = self.table.to(device)
        self.cache = torch.randn(1 + num_real * WIDTH, NUM_KV_HEADS, CONFIG.page_size,
                                 2 * HEAD_DIM, generator=g).to(device, dtype)
        rows = STEPS * GRAPH_REQUESTS + MIXED_QUERIES
        self.q = torch.randn(rows, NUM_HEADS, HEAD_DIM, generator=g).to(device, dtype)
        self.k, self.v = (torch.randn(rows, NUM_KV_HEADS, HEAD_DIM, generator=g)
                          .to(device, dtype) for _ in range(2))

    def steps(self):
        """(step, query_start_loc, seq_lens, num_tokens, first input row) of every step."""
        context = START.copy()
        row = 0
        for step in range(STEPS):
            if step == MIXED_STEP:
                query_lens = np.array([MIXED_QUERIES, 1, 1, 0])
            else:
                query_lens = np.array([1, 1, 1, 0])
            context += query_lens[:len(START)]
            num_tokens = max(GRAPH_REQUESTS, int(query_lens.sum()))
            yield (step, np.concatenate([[0], np.cumsum(query_lens)]),
                   np.concatenate([context, [0]]), num_tokens, row)
            row += num_tokens


def planner(device):
    return StepPlanner(CONFIG, max_num_reqs=GRAPH_REQUESTS, max_num_tokens=64, device=device,
                       num_ring_pages=CONFIG.num_ring_pages,
                       tile_queries=plan_tile_queries(CONFIG, device),
                       min_pages=decode_pages(CONFIG))


def attend(plan, q, k, v, cache, out, rotation):
    """What LMInfImpl.forward does with a plan: store the step's keys, then attend."""
    attention.write_kv(plan, k, v, cache)
    attention.run(plan, q, cache, out, rotation, HEAD_DIM ** -0.5)


def addresses(plan):
    return [x.data_ptr() for x in [plan.slot_block, plan.slot_offset] + [
        t for g in plan.groups
        for t in (g.query_rows, g.query_position, g.page_block, g.page_base)]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_replayed_decode_steps_equal_eager_steps_across_ring_wraps(dtype):
    device = torch.device("cuda")
    rotation = rope_table(device)
    stream = Stream(dtype, device)

    eager_cache = stream.cache.clone()
    eager_planner = planner(device)
    eager = []
    for step, qsl, seq_lens, n, row in stream.steps():
        plan = eager_planner.plan(qsl, seq_lens, stream.table, num_tokens=n)
        out = torch.zeros(n, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype)
        attend(plan, stream.q[row:row + n], stream.k[row:row + n], stream.v[row:row + n],
               eager_cache, out, rotation)
        eager.append(out[:int(qsl[-1])].clone())

    graph_cache = stream.cache.clone()
    graph_planner = planner(device)
    static_q = torch.zeros(GRAPH_REQUESTS, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype)
    static_k = torch.zeros(GRAPH_REQUESTS, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    static_v = torch.zeros_like(static_k)
    static_out = torch.zeros_like(static_q)
    graph, captured = None, None
    for step, qsl, seq_lens, n, row in stream.steps():
        plan = graph_planner.plan(qsl, seq_lens, stream.table, num_tokens=n)
        if step == MIXED_STEP:  # prefill chunk in the batch: eager, as vLLM runs it
            out = torch.zeros(n, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype)
            attend(plan, stream.q[row:row + n], stream.k[row:row + n], stream.v[row:row + n],
                   graph_cache, out, rotation)
            assert torch.equal(out[:int(qsl[-1])], eager[step]), f"mixed step {step}"
            continue
        static_q.copy_(stream.q[row:row + n])
        static_k.copy_(stream.k[row:row + n])
        static_v.copy_(stream.v[row:row + n])
        if graph is None:
            saved = graph_cache.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile every kernel outside the capture
                attend(plan, static_q, static_k, static_v, graph_cache, static_out, rotation)
            torch.cuda.current_stream().wait_stream(side)
            graph_cache.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                attend(plan, static_q, static_k, static_v, graph_cache, static_out, rotation)
            captured = addresses(plan)
        assert addresses(plan) == captured, f"step {step}: the plan moved"
        graph.replay()
        got = static_out[:int(qsl[-1])]
        assert torch.equal(got, eager[step]), (
            f"step {step}: max |replay - eager| {(got.float() - eager[step].float()).abs().max()}")
    assert torch.equal(graph_cache, eager_cache)
