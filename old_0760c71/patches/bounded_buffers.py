"""Host buffers vLLM sizes by max_model_len: committed as the stream uses them, not at startup.

* `InputBatch.token_ids_cpu_tensor` / `is_token_ids_tensor` are [max_num_reqs, max_model_len]
  (int32 and bool) and are zero-filled at startup: 1 GB per request slot at
  max_model_len = 2e8, charged to the KV budget (VLLM_NOTES B5). They are indexed by
  absolute position, so the layout stays; this patch backs them with one private anonymous
  mapping each (MAP_NORESERVE): the kernel hands out zero pages on first write, so memory is
  committed only for the tokens a slot has actually held. When a request leaves its slot
  (removed, or moved down by `condense`), the slot's row is returned to the kernel (madvise
  MADV_DONTNEED), so only live requests' tokens stay committed. Applied to every such
  buffer of at least LAZY_MIN_BYTES; the contents are the same zeros as before.
* The placeholder InputBatch that GPUModelRunner.__init__ builds before the KV cache spec is
  known has a block table [max_num_reqs, max_model_len / B] int32 (50 MB per slot at 2e8
  and B = 16, allocated twice on CPU). With LMINF selected its width is capped at G + R,
  the width the real input batch gets from LMInfSpec.max_num_blocks_per_req.

docs/memory.md lists each buffer with its size before and after.
"""

import contextvars
import math
import mmap

from ._patch import Patch, carries_mark, mark_applied

NAME = "bounded_buffers"
TARGET = "vllm.v1.worker.gpu_input_batch:InputBatch.__init__"
REMOVE = "vllm.v1.worker.gpu_input_batch:InputBatch.remove_request"
CONDENSE = "vllm.v1.worker.gpu_input_batch:InputBatch.condense"
RUNNER_INIT = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__"
# Smaller buffers keep vLLM's own allocation: a mapping per buffer is only worth it once
# committing it up front costs real memory.
LAZY_MIN_BYTES = 64 << 20
# Not exported by Python's mmap module; the Linux value (asm-generic/mman-common.h). Without
# it the kernel's overcommit heuristic would refuse e.g. 256 slots x 2e8 tokens up front.
MAP_NORESERVE = 0x4000
LAZY_ROWS_ATTR = "_lminf_lazy_rows"

_placeholder_blocks_cap = contextvars.ContextVar("lminf_placeholder_blocks_cap", default=None)


def lazy_zeros(shape, dtype):
    """A zero tensor backed by an anonymous mapping: pages are committed on first write.

    Returns (tensor, mapping); the tensor shares the mapping's memory.
    """
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    mapping = mmap.mmap(-1, nbytes,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return torch.frombuffer(mapping, dtype=dtype).view(*shape), mapping


def release_row(tensor, mapping, row: int) -> None:
    """Give the whole pages of tensor[row] back to the kernel; they read as zeros after."""
    row_bytes = tensor.shape[1] * tensor.element_size()
    start = -(-row * row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (row + 1) * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


class _TorchWithLazyRows:
    """`torch` as gpu_input_batch sees it while InputBatch.__init__ runs: big 2-D host
    zero buffers come from `lazy_zeros`; everything else is torch itself."""

    def __init__(self, torch_module, rows: list):
        self._torch = torch_module
        self._rows = rows

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def zeros(self, *size, dtype=None, device=None, pin_memory=False, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple) else size
        itemsize = self._torch.empty((), dtype=dtype).element_size() if dtype else 4
        if (len(shape) == 2 and str(device) == "cpu" and not pin_memory and not kwargs
                and math.prod(shape) * itemsize >= LAZY_MIN_BYTES):
            tensor, mapping = lazy_zeros(shape, dtype)
            self._rows.append((tensor, mapping))
            return tensor
        return self._torch.zeros(*size, dtype=dtype, device=device, pin_memory=pin_memory,
                                 **kwargs)


def _install() -> None:
    import torch
    from vllm.v1.worker import gpu_input_batch
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import lminf_vllm
    from lminf_vllm import config as lminf_config

    input_batch_init = InputBatch.__init__
    remove_request = InputBatch.remove_request
    condense = InputBatch.condense
    runner_init = GPUModelRunner.__init__

    def input_batch_init_bounded(self, *args, **kwargs):
        cap = _placeholder_blocks_cap.get()
        if cap is not None and "max_num_blocks_per_req" in kwargs:
            kwargs["max_num_blocks_per_req"] = [min(n, cap)
                                                for n in kwargs["max_num_blocks_per_req"]]
        rows = []
        gpu_input_batch.torch = _TorchWithLazyRows(torch, rows)
        try:
            input_batch_init(self, *args, **kwargs)
        finally:
            gpu_input_batch.torch = torch
        setattr(self, LAZY_ROWS_ATTR, rows)

    def remove_request_releasing(self, req_id):
        req_index = remove_request(self, req_id)
        if req_index is not None:
            for tensor, mapping in getattr(self, LAZY_ROWS_ATTR, ()):
                release_row(tensor, mapping, req_index)
        return req_index

    def condense_releasing(self):
        rows = getattr(self, LAZY_ROWS_ATTR, ())
        if not rows:
            return condense(self)
        index_before = dict(self.req_id_to_index)
        condense(self)
        for req_id, index in index_before.items():
            if self.req_id_to_index.get(req_id) != index:  # moved down: old row is empty
                for tensor, mapping in rows:
                    release_row(tensor, mapping, index)

    def runner_init_bounded(self, vllm_config, *args, **kwargs):
        cap = None
        if lminf_vllm.is_selected(vllm_config):
            config = lminf_config.from_vllm_config(vllm_config)
            cap = config.num_pinned_pages + config.num_ring_pages
        token = _placeholder_blocks_cap.set(cap)
        try:
            runner_init(self, vllm_config, *args, **kwargs)
        finally:
            _placeholder_blocks_cap.reset(token)

    InputBatch.__init__ = mark_applied(input_batch_init_bounded, NAME)
    InputBatch.remove_request = remove_request_releasing
    InputBatch.condense = condense_releasing
    GPUModelRunner.__init__ = runner_init_bounded


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("InputBatch's [max_num_reqs, max_model_len] token buffers are committed on first "
          "write and a slot's row is released when its request leaves or moves; with "
          "LMINF the placeholder block table built in GPUModelRunner.__init__ is G + R "
          "wide"),
    why=("at max_model_len = 2e8 the token buffers cost 1 GB per slot at startup (taken "
         "from the KV budget) and the placeholder block table 50 MB per slot at B = 16"),
    upstream="none found; vLLM's own comment on the buffer says 'This buffer could be too "
             "large if max_model_len is big' (TODO(woosuk))",
    remove_when="vLLM sizes the per-slot token buffers by the live stream",
    fingerprinted={TARGET: "f08db9118357af89", REMOVE: "74776981e14d7610",
                   CONDENSE: "49c263ad7095110e", RUNNER_INIT: "f3466944c1e2cbfc"},
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
