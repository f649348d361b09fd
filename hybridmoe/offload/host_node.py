"""A MoE layer's CPU experts as work on a GPU stream, so that a decode step needs no host round trip per layer.

On the layer's stream: the token's hidden state, expert ids and routing weights are copied into pinned host buffers,
the CPU is handed the layer, and the output is copied back. Two hand-overs, both captured into a CUDA graph like any
other stream work:
    pool       (the default) the stream writes a doorbell word that `kernels.cpu.host_pool`'s spinning threads watch
               (cuStreamWriteValue32) and waits for their done word (cuStreamWaitValue32): no thread wakes up
    host node  where stream memory operations are unavailable: `cuLaunchHostFunc` runs `kernels.cpu.host_task` on
               the driver's thread, which starts numba's thread team
The stream waits for the CPU only where the data must: the caller queues the shared expert between `start` and the
returned `finish`, on the main stream, while the CPU works on a side stream. A whole decode step, CPU layers
included, can then be one graph replay.

The copies and the hand-overs go through the CUDA driver directly (ctypes): torch has neither call, and its own
pinned copies track events in its host allocator, which graph capture does not need here (the buffers live as long
as the node).
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
        for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
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
_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
HAND_OVER = "pool"  # or "host": host nodes even where the pool could serve (bench/decode_timeline.py compares them)
_MEM_OPS: dict[torch.device, bool] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for every layer's CPU work (the layers run one after another)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _stream_memory_ops(device: torch.device) -> bool:
    """Whether the device's streams can write and wait for host words, eagerly and inside a captured graph (tried
    once: a write, then a wait for it; the graph's run writes another value)."""
    if device not in _MEM_OPS:
        word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        stream = _side_stream(device)
        lib = _driver()

        def write_and_wait(value: int) -> None:
            _check(lib.cuStreamWriteValue32(stream.cuda_stream, word.data_ptr(), value, 0), "cuStreamWriteValue32")
            _check(lib.cuStreamWaitValue32(stream.cuda_stream, word.data_ptr(), value, _WAIT_EQ),
                   "cuStreamWaitValue32")

        try:
            with torch.cuda.device(device):
                write_and_wait(7)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    write_and_wait(9)
                graph.replay()
                torch.cuda.synchronize(device)
            _MEM_OPS[device] = int(word[0]) == 9
        except RuntimeError:
            _MEM_OPS[device] = False
    return _MEM_OPS[device]


class CpuExpertsNode:
    """One MoE layer's routed experts on the CPU, for one token (8-bit activations, the file's bytes read in place).
    Without `slots`: all of them, out = sum_k w[k] * expert_{ids[k]}(x) [1, D], the bits `QuantStore.compute_host_sum`
    gives. With `slots` (int32 [E], a host table the caller keeps equal to the GPU's: the expert's slot, or -1): only
    the experts without one, each in its row k of out [K, D]; the other rows are left for the GPU's results.
    threads: the CPU threads (the pool's, which the first node starts; or numba's for a host node); pool=False: a
    host node even where the pool could serve."""

    def __init__(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple, top_k: int,
                 device: torch.device, threads: int = 0, chunk: int | None = None, slots: np.ndarray | None = None,
                 pool: bool = True):
        from ..kernels.cpu import host_pool, host_task  # compile or load the C entry points on first use
        self.task = host_task
        dim, inter = down.shape[1], gate.shape[1]
        pin = device.type == "cuda"
        self.device = device
        self.stream = _side_stream(device) if device.type == "cuda" else None
        self.x = torch.empty(1, dim, dtype=torch.float32, pin_memory=pin)
        self.ids = torch.empty(1, top_k, dtype=torch.int64, pin_memory=pin)
        self.weights = torch.empty(1, top_k, dtype=torch.float32, pin_memory=pin)
        self.out = torch.zeros(1 if slots is None else top_k, dim, dtype=torch.float32, pin_memory=pin)
        self.weights_raw, self.slots = (gate, up, down), slots  # the block points into them
        use_pool = pool and HAND_OVER == "pool" and (self.stream is None or _stream_memory_ops(device))
        self.scratch = (np.zeros((top_k, inter), dtype=np.float32),
                        np.zeros((top_k, dim), dtype=np.float32)) if use_pool else (None, None)
        self.block = host_task.fill_block(
            host_task.new_block(), x=self.x.numpy(), ids=self.ids.numpy(), weights=self.weights.numpy(),
            out=self.out.numpy(), gate=gate, up=up, down=down, kinds=tuple(raw_int8.KIND[t] for t in types),
            mode=host_task.SUM if slots is None else host_task.PARTS, slots=slots, threads=threads, chunk=chunk,
            h=self.scratch[0], y=self.scratch[1])
        self.pool = host_pool.shared_pool(threads or host_pool.default_workers(), pin) if use_pool else None
        self.ring = self.pool.add(self.block) if use_pool else 0

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
            if self.pool is not None:
                self.pool.run(self.ring)
            else:
                self.task.run(self.block)
            return lambda: self.out.to(x.dtype, copy=True)
        main = torch.cuda.current_stream(self.device)
        xf, ids, weights = x.float().contiguous(), ids.long().contiguous(), weights.float().contiguous()
        self.stream.wait_stream(main)
        y = torch.empty(self.out.shape, dtype=torch.float32, device=self.device)
        for dst, src in ((self.x, xf), (self.ids, ids), (self.weights, weights)):
            _copy(dst, src, self.stream)
        lib, side = _driver(), self.stream.cuda_stream
        if self.pool is not None:  # ring, wait for the pool's done word, clear it for the next layer
            _check(lib.cuStreamWriteValue32(side, self.pool.door_address, self.ring, 0), "cuStreamWriteValue32")
            _check(lib.cuStreamWaitValue32(side, self.pool.done_address, 1, _WAIT_EQ), "cuStreamWaitValue32")
            _check(lib.cuStreamWriteValue32(side, self.pool.done_address, 0, 0), "cuStreamWriteValue32")
        else:
            _check(lib.cuLaunchHostFunc(side, self.task.ADDRESS, self.block.ctypes.data), "cuLaunchHostFunc")
        _copy(y, self.out, self.stream)
        inputs = [xf, ids, weights]

        def finish() -> torch.Tensor:
            # xf, ids and weights stay referenced until here: after the join, reusing their memory is ordered
            # after the side stream's reads
            main.wait_stream(self.stream)
            del inputs[:]
            return y.to(x.dtype)

        return finish
