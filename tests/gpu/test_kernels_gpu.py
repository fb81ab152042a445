"""GPU: the Triton kernels against reference.attend_group (run on the lent H100 by bench/gpu_check.sh).

Axes, each for a reason (not a full product where it buys nothing):
  * compiled variants (B, head_dim, GQA ratio, dtype): every combination, 24 kernels each;
  * runtime parameters (n_global 0/64/100, n_local 256/4096): looped inside, they only change
    the plan and the in-kernel mask;
  * one batch per case mixes decode requests at t = 0, B-1, B, B+1, n_local + B + 3, ~1e6,
    2e8 - 1, 2e8 with prefill chunks of 2..300 queries straddling pages, the first chunk of a
    stream, and a chunk at 2e8 (the ring has wrapped millions of times there);
  * 4096-query chunks (first chunk, and one at 2e8) get their own test, the reference is
    sliced by tiles to bound its memory.

Tolerance: ‖out - ref‖ / ‖ref‖ (reference: float32 math on the same fp16/bf16 inputs). The
kernels round the turned queries/keys and the softmax weights to the input dtype before
the matrix products (as flash attention rounds P), so errors of a few units of the dtype's
epsilon are expected: 2e-3 for fp16 (eps 9.8e-4) and 1.6e-2 for bf16 (eps 7.8e-3).
Results go to $LMINF_GPU_RESULTS (JSON lines) when set.
"""

import json
import os

import numpy as np
import pytest
import torch

from lminf_vllm.attention import (build_plan, plan_tile_queries, reference,
                                  rotation_for, triton_decode, triton_prefill)
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# float32: IEEE products (TF32, Triton's default for float32 dots, gives about 3e-4)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NUM_HEADS = 8
TRAINED_LENGTH = 4096
REFERENCE_TILES_PER_SLICE = 4


def rope_table(rotary_dim, trained_length, device):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    table = torch.cat([angle.cos(), angle.sin()], dim=1).float().contiguous().to(device)
    return QueryRotation(table, rotary_dim, True)


def make_case(page_size, head_dim, gqa, dtype, n_global, n_local, requests, seed=0,
              trained_length=TRAINED_LENGTH, narrowed=None):
    """A random ring cache (each request owns G + R blocks, shuffled) and two plans of it.

    narrowed: per request (n_global, n_local) at most the engine's (request_settings.py),
    or None for the engine's.

    plans: {"tile128": the CPU path's tiles, "chunk": one tile per request chunk (the plan
    the backend builds on CUDA)}; the kernels must give the same rows from both.
    """
    device = "cuda"
    g = torch.Generator().manual_seed(seed)
    config = LMInfConfig(n_global=n_global, n_local=n_local, trained_length=trained_length,
                         page_size=page_size,
                         max_prefill_chunk_tokens=max(q for q, _ in requests))
    query_lens = np.array([q for q, _ in requests])
    seq_lens = np.array([s for _, s in requests])
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)])
    width = config.num_pinned_pages + config.num_ring_pages
    num_blocks = len(requests) * width + 7
    table = torch.randperm(num_blocks, generator=g)[: len(requests) * width].view(-1, width)
    per_request = np.array(narrowed).T if narrowed else (None, None)
    plans = {name: build_plan(config, query_start_loc, seq_lens, table.to(device),
                              num_ring_pages=config.num_ring_pages, tile_queries=tile,
                              n_global=per_request[0], n_local=per_request[1])
             for name, tile in (("tile128", 128),
                                ("chunk", plan_tile_queries(config, device)))}
    kv_heads = NUM_HEADS // gqa
    kv_cache = torch.randn(num_blocks, kv_heads, page_size, 2 * head_dim, generator=g
                           ).to(device=device, dtype=dtype)
    query = torch.randn(int(query_start_loc[-1]), NUM_HEADS, head_dim, generator=g
                        ).to(device=device, dtype=dtype)
    rotation = rotation_for(rope_table(head_dim, trained_length, device), config, device)
    return plans, query, kv_cache, rotation


def reference_rows(plan, query, kv_cache, rotation, scale):
    """[T_all, H, D] float32 by reference.attend_group, a few tiles at a time (its
    [N, T, P, H, D] temporaries are large)."""
    out = torch.empty(query.shape, device=query.device, dtype=torch.float32)
    for group in plan.groups:
        for i in range(0, group.query_rows.shape[0], REFERENCE_TILES_PER_SLICE):
            part = group.apply(lambda x: x[i:i + REFERENCE_TILES_PER_SLICE])
            out[part.query_rows] = reference.attend_group(plan, part, query, kv_cache,
                                                          rotation, scale)
    return out


def check(out, ref, what, record, dtype):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = ((out - ref).norm() / ref.norm()).item()
    max_abs = (out - ref).abs().max().item()
    record.update(kernel=what, rel_err=err, max_abs_err=max_abs, tolerance=TOLERANCE[dtype])
    path = os.environ.get("LMINF_GPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if not err <= record["tolerance"]:
        bad = (out - ref).abs().amax(dim=-1)
        row, head = np.unravel_index(int(bad.argmax()), tuple(bad.shape))
        raise AssertionError(f"{what}: rel err {err:.2e} > {record['tolerance']:.1e} "
                             f"({record}); worst at query row {row} head {head}")


def run_all(plans, query, kv_cache, rotation, record):
    """Every kernel on every plan against the reference, row by row."""
    scale = query.shape[-1] ** -0.5
    ref = reference_rows(plans["tile128"], query, kv_cache, rotation, scale)
    for name, plan in plans.items():
        for group in plan.groups:
            if group.query_rows.shape[1] == 1:
                dec = triton_decode.attend_group(plan, group, query, kv_cache, rotation, scale)
                rows = group.query_rows.flatten()
                check(dec[:, 0], ref[rows], "decode", dict(record, plan=name, tiles=len(rows)),
                      query.dtype)
                # the step's output path, with the launcher's slices and with one slice (the
                # kernel stores the rows itself then): the same rows, in the output's dtype
                for splits in (None, 1):
                    step = torch.full_like(query, float("nan"))
                    triton_decode.attend_group(plan, group, query, kv_cache, rotation, scale,
                                               num_splits=splits, output=step)
                    check(step[rows].float(), ref[rows], "decode_into_output",
                          dict(record, plan=name, tiles=len(rows), num_splits=splits),
                          query.dtype)
        tiles = {int(g.query_rows.shape[1]): int(g.query_rows.shape[0]) for g in plan.groups}
        out = torch.full(query.shape, float("nan"), device=query.device)
        for group in plan.groups:
            out[group.query_rows] = triton_prefill.attend_group(plan, group, query, kv_cache,
                                                                rotation, scale)
        check(out, ref, "prefill", dict(record, plan=name, tiles=tiles), query.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 32])
def test_sweep(page_size, head_dim, gqa, dtype):
    for n_global in (0, 64, 100):
        for n_local in (256, 4096):
            b = page_size
            requests = [(1, 1), (1, b), (1, b + 1), (1, b + 2), (1, n_local + b + 4),
                        (1, 1_000_003), (1, 199_999_999), (1, 200_000_000),
                        (2, 2), (b + 1, b + 1), (37, 1000), (129, 1_000_000),
                        (300, 200_000_000), (77, n_local + 50)]
            plans, query, kv_cache, rotation = make_case(page_size, head_dim, gqa, dtype,
                                                         n_global, n_local, requests,
                                                         seed=n_global + n_local)
            run_all(plans, query, kv_cache, rotation,
                    dict(B=page_size, head_dim=head_dim, gqa=gqa, dtype=str(dtype),
                         n_global=n_global, n_local=n_local))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_chunk_4096(page_size, dtype):
    requests = [(4096, 4096), (4096, 200_000_000), (1, 200_000_000)]
    plans, query, kv_cache, rotation = make_case(page_size, 128, 4, dtype, 64, 4096, requests)
    run_all(plans, query, kv_cache, rotation,
            dict(B=page_size, head_dim=128, gqa=4, dtype=str(dtype), n_global=64,
                 n_local=4096, chunk=4096))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_per_request_settings_in_one_batch(dtype):
    """Each request its own (n_global, n_local) <= the engine's (64, 4096): decodes with
    different values in one group (what a CUDA graph replays), chunks with none pinned, a
    window of one, values off the page grid."""
    requests = [(1, 5000), (1, 5000), (1, 200_000_000), (1, 77), (37, 1000), (37, 1000),
                (300, 200_000_000), (129, 9000)]
    narrowed = [(64, 4096), (0, 1), (17, 1000), (5, 33), (64, 4096), (0, 100), (33, 4000),
                (1, 257)]
    plans, query, kv_cache, rotation = make_case(16, 128, 4, dtype, 64, 4096, requests,
                                                 narrowed=narrowed)
    run_all(plans, query, kv_cache, rotation,
            dict(B=16, head_dim=128, gqa=4, dtype=str(dtype), n_global=64, n_local=4096,
                 narrowed=narrowed))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_float32_uses_ieee_products(head_dim):
    """float32 is advertised: the kernels' products must be IEEE float32, not TF32."""
    for n_global in (0, 64):
        for n_local in (256, 4096):
            requests = [(1, 1), (1, 17), (1, n_local + 20), (1, 1_000_003), (1, 200_000_000),
                        (37, 1000), (129, 1_000_000), (300, 200_000_000)]
            plans, query, kv_cache, rotation = make_case(16, head_dim, 4, torch.float32,
                                                         n_global, n_local, requests,
                                                         seed=n_global + n_local)
            run_all(plans, query, kv_cache, rotation,
                    dict(B=16, head_dim=head_dim, gqa=4, dtype=str(torch.float32),
                         n_global=n_global, n_local=n_local))


def test_dispatch_uses_kernels_on_cuda():
    """attention.run on CUDA equals the reference path run on the same tensors."""
    from lminf_vllm.attention import run
    requests = [(1, 5000), (200, 9000), (1, 17)]
    plans, query, kv_cache, rotation = make_case(16, 64, 4, torch.bfloat16, 64, 256, requests)
    plan = plans["chunk"]
    out = torch.full_like(query, float("nan"))
    run(plan, query, kv_cache, out, rotation, 0.125)
    ref = torch.empty_like(query)
    reference.attend(plan, query, kv_cache, ref, rotation, 0.125)
    assert torch.isfinite(out).all()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOLERANCE[torch.bfloat16], err
