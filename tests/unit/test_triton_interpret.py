"""The Triton kernels on CPU, through the Triton interpreter, against reference.attend_group.

TRITON_INTERPRET=1 must be in force when a kernel is *decorated* and when it launches, and
anything else in the test session (vLLM imports triton too) may have imported triton first.
So under a plain pytest run this module holds one test that runs the module again in a
fresh interpreter with TRITON_INTERPRET=1 set from the start, where the real tests below
are defined; its output names every failing case. Shapes are tiny: every kernel code path
(decode slices, prefill exact/capped cases, ring wrap, positions near 2e8, GQA, neox and
GPT-J pairs, padded head_dim) runs in seconds.

bf16 is not tested here: the interpreter's tl.dot on bf16 returns garbage in triton 3.9
(a 16x16 bf16 dot is off by 1e10), so bf16 is covered by tests/gpu only.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:
    def test_kernels_in_a_fresh_interpreter():
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        print(result.stdout.strip().splitlines()[-1])
else:
    from lminf_vllm.attention import triton_decode, triton_prefill

from lminf_vllm.attention import build_plan, reference
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig

# ‖out - ref‖ / ‖ref‖ per dtype. float32: only re-association (~1e-7). float16: the kernels
# round the turned queries/keys and the softmax weights to fp16 before the matrix products,
# as flash attention rounds P, so ~1e-4..1e-3 is expected.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3}


def _rotation(rotary_dim: int, trained_length: int, neox: bool) -> QueryRotation:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = torch.arange(trained_length + 1, dtype=torch.float64)[:, None] * inv_freq
    table = torch.cat([angle.cos(), angle.sin()], dim=1).float().contiguous()
    return QueryRotation(table, rotary_dim, neox)


def _setup(case, seed=0):
    """A random ring cache and a plan for a batch of requests (query_len, seq_len)."""
    g = torch.Generator().manual_seed(seed)
    config = LMInfConfig(n_global=case["n_global"], n_local=case["n_local"],
                         trained_length=case["L"], page_size=case["B"],
                         max_prefill_chunk_tokens=max(q for q, _ in case["requests"]))
    query_lens = np.array([q for q, _ in case["requests"]])
    seq_lens = np.array([s for _, s in case["requests"]])
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)])
    width = config.num_pinned_pages + config.num_ring_pages
    num_blocks = len(seq_lens) * width + 3
    block_table = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width]
    narrowed = np.array(case.get("narrowed", [(config.n_global, config.n_local)] * len(seq_lens)))
    plan = build_plan(config, query_start_loc, seq_lens, block_table.view(-1, width),
                      num_ring_pages=config.num_ring_pages, tile_queries=case.get("tile", 32),
                      n_global=narrowed[:, 0], n_local=narrowed[:, 1])
    dtype, d = case["dtype"], case["D"]
    kv_cache = torch.randn(num_blocks, case["Hkv"], case["B"], 2 * d, generator=g).to(dtype)
    # slots no request has written yet (past its last position) hold NaN: a kernel must
    # never let them reach the output, not even as 0 * NaN
    owner = torch.full((num_blocks,), -1, dtype=torch.long)
    owner[block_table] = torch.arange(len(seq_lens)).repeat_interleave(width)
    for grp in plan.groups:
        for block, base in zip(grp.page_block.flatten().tolist(),
                               grp.page_base.flatten().tolist()):
            if base >= 0:
                unwritten = base + np.arange(case["B"]) >= seq_lens[owner[block]]
                kv_cache[block, :, torch.from_numpy(unwritten)] = float("nan")
    query = torch.randn(int(query_start_loc[-1]), case["H"], d, generator=g).to(dtype)
    rotation = _rotation(case.get("rotary_dim", d), case["L"], case.get("neox", True))
    needed = max(triton_prefill.angles_needed(config, g.query_rows.shape[1])
                 for g in plan.groups)
    return plan, query, kv_cache, rotation.with_angles(needed)


def _assert_matches(out, ref, group, dtype, what):
    err = ((out - ref).norm() / ref.norm()).item()
    if not err <= TOLERANCE[dtype]:
        bad = (out - ref).abs().amax(dim=-1)                          # [N, T, H]
        tile, row, head = np.unravel_index(int(bad.argmax()), tuple(bad.shape))
        raise AssertionError(
            f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}; worst at tile {tile} "
            f"(query row {int(group.query_rows[tile, row])}, position "
            f"{int(group.query_position[tile, row])}), head {head}, max abs "
            f"{bad.max().item():.3e}; pages {group.page_base[tile].tolist()}")


CASES = {
    # decode + chunks straddling pages, ring wrap, n_global not a page multiple, GQA 2
    "mixed_neox_fp32": dict(B=16, L=128, n_global=20, n_local=64, D=32, H=4, Hkv=2,
                            dtype=torch.float32,
                            requests=[(1, 1), (1, 17), (70, 70), (33, 533), (1, 1000),
                                      (5, 131)]),
    # GPT-J pairs, head_dim 48 (padded to 64 in-kernel), no global tokens, GQA 1
    "gptj_d48_fp32": dict(B=16, L=64, n_global=0, n_local=40, D=48, H=2, Hkv=2,
                          dtype=torch.float32, neox=False,
                          requests=[(1, 16), (1, 300), (40, 95), (9, 9)]),
    # B = 32, GQA 8, n_global 100, n_local = L - B + 1, positions near 2e8 through the ring
    "far_fp16_gqa8": dict(B=32, L=160, n_global=100, n_local=129, D=32, H=8, Hkv=1,
                          dtype=torch.float16,
                          requests=[(1, 200_000_000), (1, 199_999_969), (48, 200_000_000),
                                    (1, 33), (20, 150)]),
    # one tile per request chunk (the GPU plan): tiles longer than L (angles composed past
    # the table), several row blocks per tile, n_local = L (the oldest window pages mix
    # exact and capped pairs), partial rotary (passthrough features), first chunk + mid-stream
    "whole_chunks_fp32": dict(B=8, L=64, n_global=12, n_local=64, D=32, rotary_dim=16, H=4,
                              Hkv=2, dtype=torch.float32, tile=200,
                              requests=[(150, 150), (200, 1000), (37, 5037), (1, 700)]),
    # global pages that only some row blocks are past L for: the far-global run ends inside
    # the global pages (the chunk starting at t0 = 43: pages before base 16 are far)
    "far_boundary_fp32": dict(B=8, L=32, n_global=40, n_local=24, D=32, H=2, Hkv=1,
                              dtype=torch.float32, tile=200,
                              requests=[(200, 200), (7, 75), (12, 55)]),
    # each request its own (n_global, n_local) (request_settings.py), at most the engine's:
    # decodes with different values in one group (what a CUDA graph replays), chunks with
    # none pinned, a window of one, values off the page grid; one tile per request chunk
    "per_request_decode_mix_fp32": dict(B=16, L=128, n_global=40, n_local=100, D=32, H=4,
                                        Hkv=2, dtype=torch.float32,
                                        requests=[(1, 500), (1, 500), (1, 37), (1, 1000),
                                                  (70, 70), (33, 533)],
                                        narrowed=[(40, 100), (0, 1), (17, 33), (3, 64),
                                                  (0, 20), (21, 99)]),
    "per_request_whole_chunks_fp32": dict(B=8, L=64, n_global=12, n_local=64, D=32, H=2,
                                          Hkv=1, dtype=torch.float32, tile=200,
                                          requests=[(150, 150), (150, 150), (37, 5037)],
                                          narrowed=[(12, 64), (5, 17), (0, 1)]),
    "whole_chunks_fp16": dict(B=16, L=128, n_global=64, n_local=113, D=64, H=2, Hkv=1,
                              dtype=torch.float16, tile=300,
                              requests=[(300, 2_000_000), (300, 300), (5, 70)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_reference(name):
    case = CASES[name]
    plan, query, kv_cache, rotation = _setup(case)
    scale = case["D"] ** -0.5
    for group in plan.groups:
        ref = reference.attend_group(plan, group, query, kv_cache, rotation, scale)
        # small blocks, so that tiles span several row blocks and every loop of the kernel
        # runs (masked blocks narrower than unmasked ones, as in the defaults); then the
        # default shape for this window and the long windows' shapes (both head sizes)
        small = dict(block_m=32, block_n=32, edge_block_n=16, general_block_n=16,
                     far_block_n=16)
        # each arrangement of the window's loops (merge_capped, causal_loop) with small
        # blocks, then the defaults
        for blocks in (dict(small, merge_capped=0, causal_loop=0),
                       dict(small, merge_capped=1, causal_loop=0),
                       dict(small, merge_capped=0, causal_loop=1),
                       dict(small, merge_capped=1, causal_loop=1),
                       # rows as (query, head) pairs of one KV head: 2 and 4 heads a program;
                       # the far global pages from the dense copy
                       dict(small, merge_capped=1, causal_loop=0, pack_heads=4, far_dense=1),
                       dict(small, merge_capped=0, causal_loop=1, pack_heads=2),
                       dict(small, far_dense=1), {},
                       triton_prefill.LONG_WINDOW_BLOCKS,
                       triton_prefill.LONG_WINDOW_SMALL_HEAD_BLOCKS):
            out = triton_prefill.attend_group(plan, group, query, kv_cache, rotation, scale,
                                              **blocks)
            _assert_matches(out, ref, group, case["dtype"], f"{name} prefill kernel {blocks}")
        # straight into the step's output rows, in the query's dtype (the backend's call);
        # rows of other groups are left alone
        step_output = torch.full_like(query, float("nan"))
        triton_prefill.attend_group(plan, group, query, kv_cache, rotation, scale,
                                    output=step_output)
        _assert_matches(step_output[group.query_rows].float(), ref, group, case["dtype"],
                        f"{name} prefill kernel into the step's output")
        others = torch.ones(query.shape[0], dtype=torch.bool)
        others[group.query_rows.flatten()] = False
        assert step_output[others].isnan().all(), f"{name}: rows of other groups written"
        if group.query_rows.shape[1] == 1:
            for splits in (1, 3):
                out = triton_decode.attend_group(plan, group, query, kv_cache, rotation,
                                                 scale, num_splits=splits, block_keys=32)
                _assert_matches(out, ref, group, case["dtype"],
                                f"{name} decode kernel ({splits} slices)")
                # into the step's output rows: by the merge launch (3 slices) or by the
                # decode kernel itself (1 slice); rows of other groups are left alone
                step_output = torch.full_like(query, float("nan"))
                triton_decode.attend_group(plan, group, query, kv_cache, rotation, scale,
                                           num_splits=splits, block_keys=32,
                                           output=step_output)
                _assert_matches(step_output[group.query_rows].float(), ref, group,
                                case["dtype"], f"{name} decode into the step's output "
                                f"({splits} slices)")
                assert step_output[others].isnan().all(), \
                    f"{name}: decode wrote rows of other groups"


def test_decode_equals_last_prefill_row():
    """Metamorphic: a decode step gives the last row of the prefill chunk that ends at it."""
    case = dict(CASES["mixed_neox_fp32"], requests=[(40, 300)])
    plan, query, kv_cache, rotation = _setup(case, seed=1)
    last = None
    for g in plan.groups:
        out = triton_prefill.attend_group(plan, g, query, kv_cache, rotation, 0.2)
        hit = (g.query_rows == 39).nonzero()
        if len(hit):
            last = out[hit[0, 0], hit[0, 1]]
    config = plan.config
    width = config.num_pinned_pages + config.num_ring_pages
    table = torch.full((1, width), -1, dtype=torch.long)  # the blocks the plan used
    for g in plan.groups:
        for block, base in zip(g.page_block.flatten().tolist(), g.page_base.flatten().tolist()):
            if base >= 0:
                page = base // config.page_size
                column = page if page < config.num_pinned_pages else (
                    config.num_pinned_pages
                    + (page - config.num_pinned_pages) % config.num_ring_pages)
                table[0, column] = block
    decode_plan = build_plan(config, np.array([0, 1]), np.array([300]), table.clamp(min=0),
                             num_ring_pages=config.num_ring_pages)
    (group,) = decode_plan.groups
    out = triton_decode.attend_group(decode_plan, group, query[39:40], kv_cache, rotation, 0.2)
    torch.testing.assert_close(out[0, 0], last, rtol=1e-5, atol=1e-5)


def test_launchers_reject_bad_inputs():
    plan, query, kv_cache, rotation = _setup(CASES["mixed_neox_fp32"])
    group = next(g for g in plan.groups if g.query_rows.shape[1] == 1)
    with pytest.raises(ValueError, match="dtype"):
        triton_decode.attend_group(plan, group, query.half(), kv_cache, rotation, 1.0)
    with pytest.raises(ValueError, match="2 \\* head_dim"):
        triton_prefill.attend_group(plan, group, query, kv_cache[..., :-2], rotation, 1.0)
    prefill_group = next(g for g in plan.groups if g.query_rows.shape[1] > 1)
    with pytest.raises(ValueError, match="one query per tile"):
        triton_decode.attend_group(plan, prefill_group, query, kv_cache, rotation, 1.0)
    short = QueryRotation(rotation.cos_sin[:10], rotation.rotary_dim, True)
    with pytest.raises(ValueError, match="with_angles"):
        triton_prefill.attend_group(plan, prefill_group, query, kv_cache, short, 1.0)
    with pytest.raises(ValueError, match="output must be"):
        triton_prefill.attend_group(plan, prefill_group, query, kv_cache, rotation, 1.0,
                                    output=query[:, :1])
    with pytest.raises(TypeError, match="block_k"):  # a misspelt block argument
        triton_prefill.attend_group(plan, prefill_group, query, kv_cache, rotation, 1.0,
                                    block_k=64)


if not INTERPRETED:
    # Outside the interpreter these run only through test_kernels_in_a_fresh_interpreter.
    del test_kernels_match_reference, test_decode_equals_last_prefill_row
    del test_launchers_reject_bad_inputs
