"""Λ-attention on the CPU: the serving path, a fused C++ kernel over the paged cache.

The reference (reference.py) states DESIGN §2 in the plainest tensor form and materialises
[T, P, B] logits; the kernel (csrc/lminf_cpu_attention.cpp) computes the same numbers as a
flash attention that reads each page's keys and values in place and turns the queries per
page instead (DESIGN §3): per block of queries and page, one GEMM for the logits, an online
softmax masked to the Λ window, one GEMM into the accumulator (torch's own CPU GEMM, MKL or
oneDNN). Nothing is gathered, no key is turned, nothing is built per step beyond the plan.

The kernel is compiled once per machine the first time a CPU engine needs it (about a
minute; torch's extension cache keeps it under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions
by default), for the widest vector ISA torch reports, since the softmax loops are what the
compiler vectorises. `scripts/install.sh` builds it ahead.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from lminf_vllm.attention.plan import AttentionPlan
from lminf_vllm.attention.rotation import QueryRotation
from lminf_vllm.config import LMInfConfigError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lminf_cpu_attention.cpp"
# Compiler flags per torch.backends.cpu.get_cpu_capability(): the kernel is built on, and
# for, the machine that runs it.
# CPU_CAPABILITY_* selects the matching at::vec implementation (as torch's own kernels do).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


# Queries per work item of the kernel (kQueryBlock in the C++ source).
QUERY_BLOCK = 128


def angles_needed(config) -> int:
    """Rows of the rotation table the kernel reads: query angles lie in [-(B - 1), L], and
    a GEMM-sized block's frame turns reach QUERY_BLOCK + B (QueryRotation.with_angles
    composes rows past L from the model's own)."""
    return max(config.trained_length, QUERY_BLOCK + config.page_size) + 1


def tile_queries(config) -> int:
    """Queries per plan tile: a whole chunk. The kernel cuts tiles into blocks itself and
    skips, per block, the pages none of its queries sees, so longer tiles cost nothing."""
    return config.max_prefill_chunk_tokens


def build(source: Path, name: str) -> None:
    """Compile and load a C++ source registering torch ops, for this machine's vector ISA
    (LMInfConfigError, with the compiler's message, when it cannot be built)."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp-simd", *ISA_FLAGS.get(isa, [])]
    logger.info("lminf: building %s for %s (once per machine)", source.name, isa)
    try:
        cpp_extension.load(name=f"{name}_{isa.lower()}", sources=[str(source)],
                           extra_cflags=flags, is_python_module=False, verbose=False)
    except Exception as error:  # the compiler's own message says what is missing
        raise LMInfConfigError(
            f"lminf: could not build the CPU attention kernel ({source.name}): {error}. It "
            "needs a C++ compiler (g++) and ninja; or set additional_config "
            "lminf.attention_impl='reference' (exact, much slower)") from error


@functools.cache
def kernel():
    """torch.ops.lminf_cpu, compiled on first use."""
    if not hasattr(torch.ops.lminf_cpu, "attend_group"):
        build(SOURCE, "lminf_cpu_attention")
    return torch.ops.lminf_cpu


def write_kv(plan: AttentionPlan, key: torch.Tensor, value: torch.Tensor,
             kv_cache: torch.Tensor) -> None:
    """reference.write_kv in one kernel call. key, value: [T, Hkv, D]."""
    kernel().write_kv(key.to(kv_cache.dtype), value.to(kv_cache.dtype), kv_cache,
                      plan.slot_block, plan.slot_offset)


def attend(plan: AttentionPlan, query: torch.Tensor, kv_cache: torch.Tensor,
           output: torch.Tensor, rotation: QueryRotation, scale: float) -> None:
    """Λ-attention for every query of the step. query, output: [T_all, H, D]."""
    ops = kernel()
    rotation = rotation.with_angles(angles_needed(plan.config))  # itself when long enough
    for group in plan.groups:
        ops.attend_group(query, kv_cache, output, group.query_rows, group.query_position,
                         group.page_block, group.page_base, group.n_global, group.n_local,
                         rotation.cos_sin, rotation.rotary_dim, rotation.is_neox_style,
                         plan.config.trained_length, scale)
