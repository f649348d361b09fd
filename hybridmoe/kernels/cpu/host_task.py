"""A layer's CPU experts at decode as one C-callable function, for work started outside Python.

A CUDA graph's host node (`cuLaunchHostFunc`) runs a function pointer on the driver's own thread, with no GIL, when
the stream reaches it. `run_task` (a numba cfunc) is such a function: its one argument is the address of a task
block, int64 fields that point at the layer's stacked raw expert weights (the file's bytes, read in place) and at
fixed host buffers for the token's hidden state, its K expert ids and routing weights, and the output. It runs
`raw_int8.ffn` on them, so its results are the bits `ffn_raw_int8` gives for the same inputs.

Each run adds 1 to RUNS and the time-stamp counter ticks it took to CYCLES, and leaves its start and end ticks in
STARTED and ENDED (`cycles_per_second` converts), so the time inside the node can be told from the waits around it.

Two modes (field MODE):
    SUM    every routed expert on the CPU: out [1, D] = sum_k w[k] * expert_{ids[k]}(x), in k order
    PARTS  only the experts whose entry in a slot table (int32 [E], field SLOTS) is negative: out [K, D] gets
           expert_{ids[k]}(x) in row k for those k; the other rows are left as they are (the GPU computes them)
"""
from __future__ import annotations

import ctypes
import time

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.np.ufunc import parallel
from numba.extending import intrinsic

from . import raw_int8

# Task block fields (int64 each)
(MODE, X, IDS, WEIGHTS, OUT, SLOTS, GATE, UP, DOWN, DIM, INTER, N_EXPERTS, TOP_K, GATE_KIND, UP_KIND, DOWN_KIND,
 GATE_ROW, UP_ROW, DOWN_ROW, THREADS, SET_THREADS, CHUNK, SET_CHUNK, RUNS, CYCLES, STARTED, ENDED, H, Y) = range(29)
N_FIELDS = 29  # H, Y: scratch that `host_pool`'s threads share (f32 [K, I] and [K, D]); run_task does not use them
SUM, PARTS = 0, 1


@intrinsic
def _pointer(typingctx, address, kind):
    """An int64 address as a pointer to `kind` (a numpy scalar type), for numba.carray."""
    sig = types.CPointer(kind.instance_type)(types.int64, kind)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _ticks(typingctx):
    """The CPU's time-stamp counter (llvm.readcyclecounter: rdtsc on x86-64)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter"), [])

    return sig, codegen


@njit(cache=True)
def ticks() -> int:
    return _ticks()


def cycles_per_second(seconds: float = 0.05) -> float:
    """Time-stamp counter ticks per second, measured against time.perf_counter."""
    ticks()  # compiled or loaded before the clock starts
    t0, c0 = time.perf_counter(), ticks()
    while time.perf_counter() - t0 < seconds:
        pass
    return (ticks() - c0) / (time.perf_counter() - t0)


@njit(cache=True)
def _run(f):
    dim, inter, n_experts, top_k = f[DIM], f[INTER], f[N_EXPERTS], f[TOP_K]
    x = carray(_pointer(f[X], np.float32), (1, dim))
    ids = carray(_pointer(f[IDS], np.int64), (top_k,))
    gate = carray(_pointer(f[GATE], np.uint8), (n_experts, inter, f[GATE_ROW]))
    up = carray(_pointer(f[UP], np.uint8), (n_experts, inter, f[UP_ROW]))
    down = carray(_pointer(f[DOWN], np.uint8), (n_experts, dim, f[DOWN_ROW]))
    kinds = np.empty(3, dtype=np.int64)
    kinds[0], kinds[1], kinds[2] = f[GATE_KIND], f[UP_KIND], f[DOWN_KIND]
    if f[MODE] == SUM:
        w = carray(_pointer(f[WEIGHTS], np.float32), (1, top_k))
        out = carray(_pointer(f[OUT], np.float32), (1, dim))
        y = np.empty((top_k, 1, dim), dtype=np.float32)
        raw_int8.ffn(kinds, x, gate, up, down, ids, y, w, out)
    else:
        slots = carray(_pointer(f[SLOTS], np.int32), (n_experts,))
        parts = carray(_pointer(f[OUT], np.float32), (top_k, dim))
        at = np.empty(top_k, dtype=np.int64)
        n = 0
        for k in range(top_k):
            if slots[ids[k]] < 0:
                at[n] = k
                n += 1
        if n:
            experts = np.empty(n, dtype=np.int64)
            for g in range(n):
                experts[g] = ids[at[g]]
            y = np.empty((n, 1, dim), dtype=np.float32)
            no_rows = np.empty((0, 0), dtype=np.float32)
            raw_int8.ffn(kinds, x, gate, up, down, experts, y, no_rows, no_rows)
            for g in range(n):
                parts[at[g]] = y[g, 0]


@intrinsic
def _call_with_int(typingctx, address, n):
    """Call the C function void f(int) at `address` with n."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.trunc(args[1], ir.IntType(32))])
        return context.get_dummy_value()

    return sig, codegen


parallel._launch_threads()  # the cached cfunc calls the parallel kernels: their threading layer must be loaded


@cfunc(types.void(types.int64), cache=True)
def run_task(block):
    """The host function: block is the address of a task block (a void* in C, the same register)."""
    f = carray(_pointer(block, np.int64), (N_FIELDS,))
    start = _ticks()
    if f[THREADS] > 0:  # numba's thread count is per calling thread; the driver's thread starts with all cores
        _call_with_int(f[SET_THREADS], f[THREADS])
    if f[SET_CHUNK]:  # so is the parallel chunk size (0: static split; n: chunks of n iterations, taken in turn)
        _call_with_int(f[SET_CHUNK], f[CHUNK])
    _run(f)
    end = _ticks()
    f[RUNS] += 1
    f[CYCLES] += end - start
    f[STARTED], f[ENDED] = start, end


ADDRESS = run_task.address  # for cuLaunchHostFunc
_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ADDRESS)


def _address_of(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def new_block() -> np.ndarray:
    return np.zeros(N_FIELDS, dtype=np.int64)


def run(block: np.ndarray) -> None:
    """Run a task block now, in this thread (the CPU standing in for the GPU, and the tests), through the same C
    entry point a host node calls; the GIL is released meanwhile."""
    if block.dtype != np.int64 or block.shape != (N_FIELDS,) or not block.flags.c_contiguous:
        raise ValueError(f"a task block is a contiguous int64 array of {N_FIELDS} fields")
    _CALL(block.ctypes.data)


def _address(name: str, a: np.ndarray, dtype, shape: tuple[int, ...]) -> int:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {list(shape)}, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {list(getattr(a, 'shape', ()))}")
    return a.ctypes.data


def fill_block(block: np.ndarray, *, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, out: np.ndarray,
               gate: np.ndarray, up: np.ndarray, down: np.ndarray, kinds: tuple[int, int, int], mode: int = SUM,
               slots: np.ndarray | None = None, threads: int = 0, chunk: int | None = None,
               h: np.ndarray | None = None, y: np.ndarray | None = None) -> np.ndarray:
    """Point a task block at its buffers (which the caller keeps alive as long as the block is used): x f32 [1, D],
    ids int64 [1, K], weights f32 [1, K], out f32 [1, D] (SUM) or [K, D] (PARTS); gate, up uint8 [E, I, row_bytes],
    down [E, D, row_bytes] as `ffn_raw_int8` takes them; kinds: raw_int8.KIND of each; slots int32 [E] (PARTS).
    threads: the kernels' threads (0: numba's default); chunk: numba's parallel chunk size for the run (None: left
    as the calling thread has it). h f32 [K, I], y f32 [K, D]: the scratch a `host_pool` needs (y: SUM mode only)."""
    n_experts, inter = gate.shape[:2]
    dim, top_k = x.shape[1], ids.shape[1]
    block[:] = 0
    block[MODE] = mode
    block[X] = _address("x", x, np.float32, (1, dim))
    block[IDS] = _address("ids", ids, np.int64, (1, top_k))
    block[WEIGHTS] = _address("weights", weights, np.float32, (1, top_k))
    block[OUT] = _address("out", out, np.float32, (1, dim) if mode == SUM else (top_k, dim))
    if mode == PARTS:
        block[SLOTS] = _address("slots", slots, np.int32, (n_experts,))
    elif mode != SUM:
        raise ValueError(f"mode {mode}: use SUM or PARTS")
    for field, name, a, rows in ((GATE, "gate", gate, inter), (UP, "up", up, inter), (DOWN, "down", down, dim)):
        if a.ndim != 3 or a.shape[:2] != (n_experts, rows) or a.dtype != np.uint8 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous uint8 [{n_experts}, {rows}, row_bytes] array, got "
                             f"{a.dtype} {list(a.shape)}")
        block[field] = a.ctypes.data
        block[field - GATE + GATE_ROW] = a.shape[2]
    block[GATE_KIND], block[UP_KIND], block[DOWN_KIND] = kinds
    block[DIM], block[INTER], block[N_EXPERTS], block[TOP_K] = dim, inter, n_experts, top_k
    if threads > 0:
        block[THREADS], block[SET_THREADS] = threads, _address_of(parallel._set_num_threads)
    if chunk is not None:
        block[CHUNK], block[SET_CHUNK] = chunk, _address_of(parallel._set_parallel_chunksize)
    if h is not None:
        block[H] = _address("h", h, np.float32, (top_k, inter))
    if y is not None:
        block[Y] = _address("y", y, np.float32, (top_k, dim))
    return block
