"""The Triton kernels compile for the H100 (sm_90) here, on a machine without a GPU.

The interpreter (test_triton_interpret.py) checks what the kernels compute but not whether
they compile: it accepts things compiled Triton rejects (a float global inside a kernel cost a
GPU run once). Here each launcher runs on CPU tensors with its kernels' launches captured, and
every captured launch is compiled with triton.compile for sm_90, through ptxas to a cubin,
with the launcher's own arguments, compile options and the benchmark's shapes. The shared
memory each kernel asks for must fit an H100 block (227 KB).
"""

import numpy as np
import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lminf_vllm.attention import build_plan, triton_decode, triton_prefill
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfig

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448
TENSOR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                torch.int64: "*i64", torch.int32: "*i32"}
OPTIONS = ("num_warps", "num_stages", "maxnreg")


class CapturedKernel:
    """Stands in for a @triton.jit kernel: records each launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
        return launch


def compile_launch(kernel, args, kwargs):
    """triton.compile of one launch, specialised as the JIT does at a launch: pointers and
    integers divisible by 16 marked so (it vectorises loads and sizes the pipelines' shared
    memory by them), integers equal to 1 made constants."""
    names = kernel.arg_names
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value, param = values[name], kernel.params[index]
        if param.is_constexpr:
            signature[name], constexprs[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = TENSOR_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif int(value) == 1 and not param.do_not_specialize:
            signature[name], constexprs[(index,)] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
            if int(value) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=H100, options=options)


def benchmark_case(position, chunk, gqa=4, head_dim=128, page_size=16, n_local=4096,
                   dtype=torch.bfloat16):
    """The shapes of bench/bench_kernels.py (bf16, 32 query heads, n_local 4096), on CPU."""
    config = LMInfConfig(n_global=64, n_local=n_local, trained_length=4096, page_size=page_size,
                         max_prefill_chunk_tokens=chunk)
    width = config.num_pinned_pages + config.num_ring_pages
    plan = build_plan(config, np.array([0, chunk]), np.array([position + chunk]),
                      torch.arange(width).view(1, width), num_ring_pages=config.num_ring_pages,
                      tile_queries=chunk)
    kv_cache = torch.zeros(width, 32 // gqa, page_size, 2 * head_dim, dtype=dtype)
    query = torch.zeros(chunk, 32, head_dim, dtype=dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(4097, dtype=torch.float64)[:, None] * inv_freq
    rotation = QueryRotation(torch.cat([angle.cos(), angle.sin()], 1).float(), head_dim, True)
    rotation = rotation.with_angles(triton_prefill.angles_needed(config, chunk))
    return plan, query, kv_cache, rotation


@pytest.mark.parametrize("module,kernels,case", [
    (triton_prefill, ("turn_pages_kernel", "lambda_prefill_kernel"), (1_000_000, 4096)),
    # a short window: the other block shape (triton_prefill.SHORT_WINDOW_BLOCKS)
    (triton_prefill, ("turn_pages_kernel", "lambda_prefill_kernel"), (1_000_000, 4096, 4, 128,
                                                                       16, 256)),
    # a long window with small heads: LONG_WINDOW_SMALL_HEAD_BLOCKS
    (triton_prefill, ("turn_pages_kernel", "lambda_prefill_kernel"), (1_000_000, 4096, 4, 64)),
    # one request: the launcher splits its pages, so the merge kernel runs too
    (triton_decode, ("lambda_decode_kernel", "merge_splits_kernel"), (1_000_000, 1)),
    # float32 (IEEE products): its own block shapes must fit
    (triton_decode, ("lambda_decode_kernel", "merge_splits_kernel"), (1_000_000, 1, 4, 128, 16,
                                                                       4096, torch.float32)),
], ids=["prefill", "prefill_short_window", "prefill_small_head", "decode", "decode_float32"])
def test_kernels_compile_for_h100(module, kernels, case, monkeypatch):
    captured = {name: CapturedKernel(getattr(module, name)) for name in kernels}
    for name, stand_in in captured.items():
        monkeypatch.setattr(module, name, stand_in)
    plan, query, kv_cache, rotation = benchmark_case(*case)
    (group,) = plan.groups
    module.attend_group(plan, group, query, kv_cache, rotation, 0.088)
    for name, stand_in in captured.items():
        assert stand_in.launches, f"{name} was not launched"
        for args, kwargs in stand_in.launches:
            compiled = compile_launch(stand_in.kernel, args, kwargs)
            assert "cubin" in compiled.asm
            assert compiled.metadata.shared <= H100_SHARED_MEMORY, \
                f"{name} needs {compiled.metadata.shared} bytes of shared memory"
