"""TensorRT's device-buffer bookkeeping (cuda-python, no torch), against a fake CUDA runtime.

No GPU here: the engine paths are covered by the backend template tests where a GPU exists
(they skip with the reason otherwise); what is pure is tested here.
"""
from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy as np
import pytest

from edgeprune.backends.tensorrt_backend import DeviceBuffers, cuda_call
from edgeprune.errors import CompileError


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class FakeRuntime:
    """The slice of ``cuda.bindings.runtime`` DeviceBuffers uses; device memory is a dict of bytearrays."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.next_ptr = 0x1000
        self.streams = 0
        self.freed: list[int] = []

    def cudaStreamCreate(self):
        self.streams += 1
        return _Err.cudaSuccess, 77

    def cudaStreamDestroy(self, stream):
        self.streams -= 1
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        return (_Err.cudaSuccess,)

    def cudaMalloc(self, nbytes):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + 0x1000 + nbytes
        self.mem[ptr] = bytearray(nbytes)
        return _Err.cudaSuccess, ptr

    def cudaFree(self, ptr):
        del self.mem[ptr]
        self.freed.append(ptr)
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        if kind == "h2d":
            self.mem[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(self.mem[src][:nbytes]), nbytes)
        return (_Err.cudaSuccess,)


def test_buffers_grow_only_when_needed_and_round_trip():
    rt = FakeRuntime()
    buf = DeviceBuffers(rt)
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (B, C, W)
    p1 = buf.upload("input", x)
    assert buf.upload("input", x[:1]) == p1, "a smaller tensor reuses the buffer"
    p2 = buf.upload("input", np.concatenate([x, x]))
    assert p2 != p1 and rt.freed == [p1], "a larger tensor frees the old buffer and allocates a new one"
    y = np.empty((4, 3, 4), dtype=np.float32)
    buf.download("input", y)
    buf.synchronize()
    np.testing.assert_array_equal(y, np.concatenate([x, x]))
    buf.close()
    assert rt.mem == {} and rt.streams == 0


def test_download_larger_than_buffer_refused():
    buf = DeviceBuffers(FakeRuntime())
    buf.ensure("out", 8)
    with pytest.raises(CompileError, match="needs 16 bytes; its device buffer has 8"):
        buf.download("out", np.empty(4, dtype=np.float32))


def test_cuda_call_unpacks_and_raises():
    assert cuda_call((_Err.cudaSuccess, 5)) == 5
    assert cuda_call((_Err.cudaSuccess,)) is None
    assert cuda_call((_Err.cudaSuccess, 1, 2)) == (1, 2)
    with pytest.raises(CompileError, match="cudaErrorMemoryAllocation"):
        cuda_call((_Err.cudaErrorMemoryAllocation, 0))
