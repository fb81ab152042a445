"""Buffers vLLM sizes by max_model_len: committed as the stream uses them, not at startup.

Model runner v1 (CPU, and CUDA with VLLM_USE_V2_MODEL_RUNNER=0):

* `InputBatch.token_ids_cpu_tensor` / `is_token_ids_tensor` are [max_num_reqs, max_model_len]
  (int32 and bool) and are zero-filled at startup: 1 GB per request slot at
  max_model_len = 2e8, charged to the KV budget (VLLM_NOTES B5). They are indexed by
  absolute position, so the layout stays; InputBatch is built one token wide (its
  __init__ uses max_model_len for nothing else) and then gets full-width buffers from
  `lazy_memory.lazy_host_zeros` (anonymous mappings: a zero page on first write), so memory
  is committed only for the tokens a slot has actually held. When a request leaves its slot
  (removed, or moved down by `condense`), the slot's row is returned to the kernel
  (`release_row`), so only live requests' tokens stay committed.
* The placeholder InputBatch that GPUModelRunner.__init__ builds before the KV cache spec is
  known has a block table [max_num_reqs, max_model_len / B] int32 (50 MB per slot at 2e8
  and B = 16, allocated twice on CPU). With LMINF selected its width is capped at G + R,
  the width the real input batch gets from LMInfSpec.max_num_blocks_per_req. The cap is
  handed from the runner's __init__ (which has the vllm_config) to the InputBatch it builds
  through a context variable set only while that __init__ runs.

Model runner v2 (the CUDA default): every [rows, max_model_len]-sized buffer is a
`StagedWriteTensor` (`RequestState.all_token_ids`, pinned host memory read by the GPU
over UVA, 800 MB per slot at 2e8; the trace-replay and M-RoPE buffers, which LMINF does not
reach). A StagedWriteTensor of at least LAZY_MIN_BYTES is built one column wide and then
gets its full-width `.gpu` from `lazy_memory`: CUDA managed memory committed on first touch
(kept in host memory where vLLM used UVA, on the device where it used device memory), or
on a CPU device an anonymous mapping. Every reader takes `.gpu` with its row stride, so
the layout is unchanged. Managed pages are not returned when a request leaves: a v2 slot
stays committed up to the longest stream it has held.

Applied to every engine, with or without LMINF: the contents are the same zeros as before.
docs/memory.md lists each buffer with its size before and after.
"""

import contextvars

from ._patch import CPU_0_32, CUDA_0_32, CUDA_0_33, Patch, carries_mark, mark_applied

NAME = "bounded_buffers"
TARGET = "vllm.v1.worker.gpu_input_batch:InputBatch.__init__"
REMOVE = "vllm.v1.worker.gpu_input_batch:InputBatch.remove_request"
CONDENSE = "vllm.v1.worker.gpu_input_batch:InputBatch.condense"
RUNNER_INIT = "vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__"
STAGED_WRITE_INIT = "vllm.v1.worker.gpu.buffer_utils:StagedWriteTensor.__init__"
STAGED_WRITE_APPLY = "vllm.v1.worker.gpu.buffer_utils:StagedWriteTensor.apply_write"
REQUEST_STATE_INIT = "vllm.v1.worker.gpu.states:RequestState.__init__"
# Smaller buffers keep vLLM's own allocation: a lazy buffer is only worth it once
# committing it up front costs real memory.
LAZY_MIN_BYTES = 64 << 20
LAZY_ROWS_ATTR = "_lminf_lazy_rows"
# The two InputBatch buffers sized [max_num_reqs, max_model_len]; InputBatch.__init__ uses
# max_model_len for nothing else (fingerprinted), so it is built one token wide and then
# given lazily committed buffers of the full width.
TOKEN_IDS, IS_TOKEN_IDS = "token_ids_cpu_tensor", "is_token_ids_tensor"

_placeholder_blocks_cap = contextvars.ContextVar("lminf_placeholder_blocks_cap", default=None)


def lazy_token_buffers(batch, max_model_len: int) -> list:
    """Give an InputBatch built one token wide its [max_num_reqs, max_model_len] token
    buffers, backed by lazy mappings; returns the (tensor, mapping) rows to release."""
    import torch

    from lminf_vllm.lazy_memory import lazy_host_zeros

    rows = []
    for name, view, dtype in ((TOKEN_IDS, "token_ids_cpu", torch.int32),
                              (IS_TOKEN_IDS, "is_token_ids", torch.bool)):
        tensor, mapping = lazy_host_zeros((batch.max_num_reqs, max_model_len), dtype)
        setattr(batch, name, tensor)
        setattr(batch, view, tensor.numpy())
        rows.append((tensor, mapping))
    batch.max_model_len = max_model_len
    return rows


def lazy_device_zeros(shape, dtype, device, host_resident: bool):
    """A [rows, columns] zero tensor on `device` committed page by page as it is written."""
    from lminf_vllm.lazy_memory import lazy_cuda_zeros, lazy_host_zeros

    if device.type == "cuda":
        return lazy_cuda_zeros(shape, dtype, device, host_resident)
    if device.type == "cpu":
        return lazy_host_zeros(shape, dtype)[0]
    raise NotImplementedError(f"lminf: no lazily committed buffer on {device.type}")


def staged_write_is_large(size, dtype) -> bool:
    """Whether a StagedWriteTensor of `size` is one of the [rows, max_model_len] buffers."""
    from lminf_vllm.lazy_memory import nbytes_of

    return not isinstance(size, int) and len(size) == 2 and \
        nbytes_of(size, dtype) >= LAZY_MIN_BYTES


def _install() -> None:
    import inspect

    import torch
    from vllm.utils.platform_utils import is_uva_available
    from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import lminf_vllm
    from lminf_vllm import config as lminf_config
    from lminf_vllm.lazy_memory import release_row

    input_batch_init = InputBatch.__init__
    remove_request = InputBatch.remove_request
    condense = InputBatch.condense
    runner_init = GPUModelRunner.__init__
    staged_write_init = StagedWriteTensor.__init__
    input_batch_signature = inspect.signature(input_batch_init)
    staged_write_signature = inspect.signature(staged_write_init)

    def input_batch_init_bounded(self, *args, **kwargs):
        arguments = input_batch_signature.bind(self, *args, **kwargs).arguments
        cap = _placeholder_blocks_cap.get()
        if cap is not None:
            arguments["max_num_blocks_per_req"] = [
                min(n, cap) for n in arguments["max_num_blocks_per_req"]]
        max_model_len = arguments["max_model_len"]
        lazy = arguments["max_num_reqs"] * max_model_len * 4 >= LAZY_MIN_BYTES
        if lazy:
            arguments["max_model_len"] = 1
        del arguments["self"]
        input_batch_init(self, **arguments)
        setattr(self, LAZY_ROWS_ATTR, lazy_token_buffers(self, max_model_len) if lazy else [])

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

    def staged_write_init_bounded(self, *args, **kwargs):
        arguments = staged_write_signature.bind(self, *args, **kwargs)
        arguments.apply_defaults()
        size, dtype = arguments.arguments["size"], arguments.arguments["dtype"]
        if not staged_write_is_large(size, dtype):
            return staged_write_init(*arguments.args, **arguments.kwargs)
        arguments.arguments["size"] = (size[0], 1)
        staged_write_init(*arguments.args, **arguments.kwargs)
        device = torch.device(arguments.arguments["device"])
        host_resident = arguments.arguments["uva_instead_of_gpu"] and is_uva_available()
        self.gpu = lazy_device_zeros(tuple(size), dtype, device, host_resident)

    InputBatch.__init__ = mark_applied(input_batch_init_bounded, NAME)
    InputBatch.remove_request = remove_request_releasing
    InputBatch.condense = condense_releasing
    GPUModelRunner.__init__ = runner_init_bounded
    StagedWriteTensor.__init__ = staged_write_init_bounded


# The targets' sources are the same in the CPU and the CUDA wheel of 0.32.0.
RELEASE_0_32_FINGERPRINTS = {
    TARGET: "f08db9118357af89",
    REMOVE: "74776981e14d7610",
    CONDENSE: "49c263ad7095110e",
    RUNNER_INIT: "f3466944c1e2cbfc",
    STAGED_WRITE_INIT: "a4a2ee195f2fe2d4",
    STAGED_WRITE_APPLY: "45d692434b6d5c83",
    REQUEST_STATE_INIT: "a9760ee726326073",
}

PATCH = Patch(
    name=NAME,
    target=TARGET,
    what=("v1: InputBatch's [max_num_reqs, max_model_len] token buffers are committed on "
          "first write and a slot's row is released when its request leaves or moves; with "
          "LMINF the placeholder block table built in GPUModelRunner.__init__ is G + R "
          "wide. v2: every StagedWriteTensor of [rows, max_model_len] size "
          "(RequestState.all_token_ids) is CUDA managed memory committed on first touch"),
    why=("at max_model_len = 2e8 the token buffers cost 1 GB per slot at startup (v1, taken "
         "from the KV budget; v2: 800 MB of pinned host memory per slot) and the "
         "placeholder block table 50 MB per slot at B = 16"),
    upstream="none found; vLLM's own comment on the buffer says 'This buffer could be too "
             "large if max_model_len is big' (TODO(woosuk))",
    remove_when="vLLM sizes the per-slot token buffers by the live stream",
    fingerprints={
        CPU_0_32: RELEASE_0_32_FINGERPRINTS,
        CUDA_0_32: RELEASE_0_32_FINGERPRINTS,
        CUDA_0_33: {
            TARGET: "f08db9118357af89",
            REMOVE: "74776981e14d7610",
            CONDENSE: "49c263ad7095110e",
            RUNNER_INIT: "d9827835df72f4f4",
            STAGED_WRITE_INIT: "262892e882f6523a",
            STAGED_WRITE_APPLY: "99c1a65dd7412b7a",
            REQUEST_STATE_INIT: "a9760ee726326073",
        },
    },
    install=_install,
    installed=carries_mark(TARGET, NAME),
)
