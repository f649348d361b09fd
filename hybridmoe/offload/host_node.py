"""A MoE layer's CPU experts as work on a GPU stream, so that a decode step needs no host round trip per layer.

On the layer's stream: the token's hidden state, expert ids and routing weights are copied into pinned host buffers,
a host node (`cuLaunchHostFunc`; captured into a CUDA graph like any other stream work) runs the layer's experts on
the CPU through `kernels.cpu.host_task` (numba, no GIL, on the driver's thread), and the output is copied back. The
stream waits for the CPU only where the data must: the caller queues the shared expert between `start` and the
returned `finish`, on the main stream, while the CPU works on a side stream. A whole decode step, CPU layers
included, can then be one graph replay.

The copies and the host node go through the CUDA driver directly (ctypes): torch has no host-node call, and its
own pinned copies track events in its host allocator, which graph capture does not need here (the buffers live as
long as the node).
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch

from ..kernels.cpu import raw_int8

_DRIVER = None


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _DRIVER = lib
    return _DRIVER


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'CUDA error %d' % result).decode()}")


def _copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """dst <- src (same bytes, either side host-pinned or device; unified addressing), queued on `stream`."""
    if dst.dtype != src.dtype or dst.shape != src.shape or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError(f"copy of {src.dtype} {list(src.shape)} into {dst.dtype} {list(dst.shape)}")
    _check(_driver().cuMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(),
                                   stream.cuda_stream), "cuMemcpyAsync")


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_TICKS_PER_S: float | None = None


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for every layer's CPU work (the layers run one after another)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class CpuExpertsNode:
    """One MoE layer's routed experts on the CPU, for one token (8-bit activations, the file's bytes read in place).
    Without `slots`: all of them, out = sum_k w[k] * expert_{ids[k]}(x) [1, D], the bits `QuantStore.compute_host_sum`
    gives. With `slots` (int32 [E], a host table the caller keeps equal to the GPU's: the expert's slot, or -1): only
    the experts without one, each in its row k of out [K, D]; the other rows are left for the GPU's results."""

    def __init__(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple, top_k: int,
                 device: torch.device, threads: int = 0, chunk: int | None = None, slots: np.ndarray | None = None):
        from ..kernels.cpu import host_task  # compiles or loads the C entry point on first use
        self.task = host_task
        dim = down.shape[1]
        pin = device.type == "cuda"
        self.x = torch.empty(1, dim, dtype=torch.float32, pin_memory=pin)
        self.ids = torch.empty(1, top_k, dtype=torch.int64, pin_memory=pin)
        self.weights = torch.empty(1, top_k, dtype=torch.float32, pin_memory=pin)
        self.out = torch.zeros(1 if slots is None else top_k, dim, dtype=torch.float32, pin_memory=pin)
        self.weights_raw, self.slots = (gate, up, down), slots  # the block points into them
        self.block = host_task.fill_block(
            host_task.new_block(), x=self.x.numpy(), ids=self.ids.numpy(), weights=self.weights.numpy(),
            out=self.out.numpy(), gate=gate, up=up, down=down, kinds=tuple(raw_int8.KIND[t] for t in types),
            mode=host_task.SUM if slots is None else host_task.PARTS, slots=slots, threads=threads, chunk=chunk)
        self.device = device
        self.stream = _side_stream(device) if device.type == "cuda" else None

    @property
    def runs(self) -> int:
        """How often the CPU has run this layer (a graph replay runs it without Python)."""
        return int(self.block[self.task.RUNS])

    def take_seconds(self) -> float:
        """Seconds the CPU spent inside this node since the last call."""
        global _TICKS_PER_S
        if _TICKS_PER_S is None:
            _TICKS_PER_S = self.task.cycles_per_second(0.02)
        ticks, self.block[self.task.CYCLES] = int(self.block[self.task.CYCLES]), 0
        return ticks / _TICKS_PER_S

    def start(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """x [1, D], ids [1, K], weights [1, K] on the layer's device -> finish() -> out ([1, D] or [K, D], see the
        class) in x's dtype. On CUDA everything is queued (graph-capturable); work queued on the current stream
        before finish() overlaps the CPU's."""
        if self.stream is None:  # the CPU standing in for the GPU: run it now
            self.x.copy_(x)
            self.ids.copy_(ids)
            self.weights.copy_(weights)
            self.task.run(self.block)
            return lambda: self.out.to(x.dtype, copy=True)
        main = torch.cuda.current_stream(self.device)
        xf, ids, weights = x.float().contiguous(), ids.long().contiguous(), weights.float().contiguous()
        self.stream.wait_stream(main)
        y = torch.empty(self.out.shape, dtype=torch.float32, device=self.device)
        for dst, src in ((self.x, xf), (self.ids, ids), (self.weights, weights)):
            _copy(dst, src, self.stream)
        _check(_driver().cuLaunchHostFunc(self.stream.cuda_stream, self.task.ADDRESS, self.block.ctypes.data),
               "cuLaunchHostFunc")
        _copy(y, self.out, self.stream)
        inputs = [xf, ids, weights]

        def finish() -> torch.Tensor:
            # xf, ids and weights stay referenced until here: after the join, reusing their memory is ordered
            # after the side stream's reads
            main.wait_stream(self.stream)
            del inputs[:]
            return y.to(x.dtype)

        return finish
