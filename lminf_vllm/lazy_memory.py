"""Zero buffers whose memory is committed page by page as they are written. No vLLM import.

vLLM sizes some per-slot buffers [max_num_reqs, max_model_len]; at max_model_len = 2e8
that is 800 MB per slot of int32, committed at startup (patches/bounded_buffers.py). The
buffers keep their layout (they are indexed by absolute position) but get their memory
from here:

* host (`lazy_host_zeros`): a private anonymous mapping with MAP_NORESERVE; the kernel
  hands out a zero page on first write, and `release_row` gives a row's pages back.
* CUDA (`lazy_cuda_zeros`): CUDA managed memory (cuMemAllocManaged), whose pages are
  populated on first touch. `host_resident=True` keeps the pages in host memory, read by
  the GPU over the interconnect, like vLLM's pinned UVA buffers; False keeps them on the
  GPU. Managed pages are not returned before the buffer is freed, so a row stays committed
  up to the longest stream its slot has held.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch

# Not exported by Python's mmap module; the Linux value (asm-generic/mman-common.h). Without
# it the kernel's overcommit heuristic would refuse e.g. 256 slots x 2e8 tokens up front.
MAP_NORESERVE = 0x4000
# CUDA driver API constants (cuda.h).
CU_MEM_ATTACH_GLOBAL = 0x1
CU_MEM_ADVISE_SET_PREFERRED_LOCATION = 3
CU_MEM_ADVISE_SET_ACCESSED_BY = 5
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_LOCATION_TYPE_HOST = 2
CU_DEVICE_CPU = -1
_TYPESTR = {torch.int32: "<i4", torch.int64: "<i8", torch.float32: "<f4", torch.bool: "|b1"}


def nbytes_of(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def lazy_host_zeros(shape, dtype: torch.dtype):
    """A host zero tensor backed by an anonymous mapping: pages are committed on first write.

    Returns (tensor, mapping); the tensor shares the mapping's memory.
    """
    mapping = mmap.mmap(-1, nbytes_of(shape, dtype),
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return torch.frombuffer(mapping, dtype=dtype).view(*shape), mapping


def release_row(tensor: torch.Tensor, mapping: mmap.mmap, row: int) -> None:
    """Give the whole pages of tensor[row] back to the kernel; they read as zeros after."""
    row_bytes = tensor.shape[1] * tensor.element_size()
    start = -(-row * row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (row + 1) * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _ManagedAllocation:
    """Owns one cuMemAllocManaged block; torch keeps it alive through the tensor made from
    its __cuda_array_interface__ and it frees the block when the tensor goes."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device,
                 host_resident: bool) -> None:
        self._driver = ctypes.CDLL("libcuda.so.1")
        torch.zeros(1, device=device)  # the device's primary context is current
        nbytes = nbytes_of(shape, dtype)
        pointer = ctypes.c_uint64()
        self._call("cuMemAllocManaged", ctypes.byref(pointer), ctypes.c_size_t(nbytes),
                   ctypes.c_uint(CU_MEM_ATTACH_GLOBAL))
        self.pointer = pointer.value
        if host_resident:
            self._advise(nbytes, CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                         CU_MEM_LOCATION_TYPE_HOST, 0, CU_DEVICE_CPU)
        self._advise(nbytes, CU_MEM_ADVISE_SET_ACCESSED_BY, CU_MEM_LOCATION_TYPE_DEVICE,
                     device.index, device.index)
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": _TYPESTR[dtype],
                                         "data": (self.pointer, False), "version": 3,
                                         "strides": None}

    def _call(self, name: str, *args) -> None:
        status = getattr(self._driver, name)(*args)
        if status != 0:
            raise RuntimeError(f"lminf: CUDA driver {name} failed with CUresult {status}")

    def _advise(self, nbytes: int, advice: int, location_type: int, location_id: int,
                legacy_device: int) -> None:
        pointer, size = ctypes.c_uint64(self.pointer), ctypes.c_size_t(nbytes)
        if hasattr(self._driver, "cuMemAdvise_v2"):  # CUDA >= 12.2 takes a location
            self._call("cuMemAdvise_v2", pointer, size, ctypes.c_int(advice),
                       _CUmemLocation(location_type, location_id))
        else:
            self._call("cuMemAdvise", pointer, size, ctypes.c_int(advice),
                       ctypes.c_int(legacy_device))

    def __del__(self) -> None:
        if getattr(self, "pointer", None):
            self._driver.cuMemFree_v2(ctypes.c_uint64(self.pointer))


def lazy_cuda_zeros(shape, dtype: torch.dtype, device: torch.device,
                    host_resident: bool) -> torch.Tensor:
    """A CUDA zero tensor in managed memory, committed page by page on first touch."""
    device = torch.device(device.type, torch.cuda.current_device()
                          if device.index is None else device.index)
    allocation = _ManagedAllocation(shape, dtype, device, host_resident)
    return torch.as_tensor(allocation, device=device)
