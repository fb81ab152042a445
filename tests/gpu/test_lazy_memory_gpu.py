"""GPU: managed-memory token buffers (lazy_memory.lazy_cuda_zeros) are committed only where
written, read back what a GPU kernel wrote, and give their memory back when freed.

This is the allocation patches/bounded_buffers.py gives model runner v2's
[max_num_reqs, max_model_len] StagedWriteTensors (RequestState.all_token_ids) on CUDA; the
writes here go through a Triton kernel with the same addressing as vLLM's
`_apply_write_kernel` (row pointer + row stride, absolute column). vLLM itself is not
installed on the GPU machine, so the runner around it is not executed here.
Results go to $LMINF_GPU_RESULTS (JSON lines) when set.
"""

import json
import os

import pytest
import torch

from lminf_vllm.lazy_memory import lazy_cuda_zeros

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SLOTS, MAX_MODEL_LEN = 64, 200_000_000  # 51.2 GB of int32 if committed
WRITTEN = 5_000_000  # tokens written into one slot: 20 MB
SLACK = 256 << 20  # allocator and page-granularity noise


def host_available() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def device_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def record(**result):
    path = os.environ.get("LMINF_GPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "lazy_memory", **result}) + "\n")


def write_rows(buffer, row, start, values):
    """buffer[row, start:start + len(values)] = values, by pointer and row stride."""
    import triton
    import triton.language as tl

    @triton.jit
    def store(buffer_ptr, row_stride, row, start, values_ptr, n, BLOCK: tl.constexpr):
        block = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = block < n
        row_ptr = buffer_ptr + row.to(tl.int64) * row_stride + start
        tl.store(row_ptr + block, tl.load(values_ptr + block, mask=mask), mask=mask)

    block = 1024
    store[(triton.cdiv(len(values), block),)](buffer, buffer.stride(0), row, start, values,
                                              len(values), BLOCK=block)


@pytest.mark.parametrize("host_resident", [True, False], ids=["host", "device"])
def test_managed_token_buffer_commits_only_what_is_written(host_resident):
    device = torch.device("cuda")
    host_before, device_before = host_available(), device_free()
    buffer = lazy_cuda_zeros((SLOTS, MAX_MODEL_LEN), torch.int32, device, host_resident)
    assert buffer.shape == (SLOTS, MAX_MODEL_LEN) and buffer.stride(0) == MAX_MODEL_LEN
    host_allocated = host_before - host_available()
    device_allocated = device_before - device_free()
    assert host_allocated < SLACK and device_allocated < SLACK, "committed up front"

    values = torch.arange(WRITTEN, dtype=torch.int32, device=device) + 1
    write_rows(buffer, 3, 0, values)
    write_rows(buffer, 5, MAX_MODEL_LEN - WRITTEN, values)  # the far end of a row
    assert torch.equal(buffer[3, :WRITTEN], values)
    assert torch.equal(buffer[5, -WRITTEN:], values)
    assert int(buffer[3, WRITTEN]) == 0 and int(buffer[4, 123]) == 0  # untouched: zeros
    host_written = host_before - host_available()
    device_written = device_before - device_free()
    resident = host_written if host_resident else device_written
    assert resident < 2 * 2 * WRITTEN * 4 + SLACK, "more than the written pages committed"
    record(host_resident=host_resident, virtual_bytes=SLOTS * MAX_MODEL_LEN * 4,
           written_bytes=2 * WRITTEN * 4, host_after_alloc=host_allocated,
           device_after_alloc=device_allocated, host_after_write=host_written,
           device_after_write=device_written)

    del buffer
    assert device_before - device_free() < SLACK
