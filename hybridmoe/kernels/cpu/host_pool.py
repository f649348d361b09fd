"""Persistent CPU threads that run decode layers' CPU experts (`host_task` blocks) when a stream rings for them.

A host node hands each layer to the CUDA driver's callback thread, which then starts numba's thread team twice (the
gate/up and the down products): three threads woken per layer, every layer. Here the threads are ours and never
sleep while tokens are being decoded: each spins on a doorbell word in pinned memory that the GPU stream writes
(cuStreamWriteValue32), computes a fixed share of the layer, and the last one to finish sets a done word that the
stream waits for (cuStreamWaitValue32). Stream memory operations are captured by CUDA graphs like kernels, so a
decode step stays one replay. The CPU standing in for the GPU rings the same bell from Python (`HostPool.run`).

Control words (int32, one per cache line, `HostPool.control`):
    DOOR     the stream writes 1 + the task's index in the pool's table; the last worker to finish clears it
    DONE     the last worker to finish sets 1; the stream waits for 1, then clears it
    EPOCH    tasks finished: a worker that has done its share waits for it to move before it looks at DOOR again
    ARRIVED  workers finished with the current task;  GATHERED, GEN  the barrier between a task's phases
    STOP     nonzero: the workers return

A layer runs in three phases with a barrier between them; each worker takes a contiguous share of each:
    1. the gate and up rows of every expert the CPU serves (each worker rounds x to 8 bits for itself) -> h
    2. the down rows of those experts (each worker rounds the hidden states of the experts its share touches) -> y;
       PARTS mode writes them into out's rows k and ends here
    3. SUM mode: out's columns = sum_k w[k] * y[k], in k order
so the results are the bits `raw_int8.ffn` gives: the same dot products, roundings and order of the sum.

Waiting: spin (with `pause`) while work comes often; a worker that has had no task for IDLE_SPIN_S naps between
looks (NAP_US), so an idle runner costs little CPU and the first layer after a pause waits at most a nap. A pool
for the CPU standing in for the GPU naps at once: its ringing thread needs the cores between layers.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import platform
import threading

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import host_task, raw_int8
from .host_task import _call_with_int as _call_int, _pointer, _ticks  # usleep, sched_yield: int f(int)

f32 = np.float32
LINE = 16  # int32 words per cache line
DOOR, DONE, EPOCH, ARRIVED, GATHERED, GEN, STOP = (LINE * i for i in range(7))
N_CONTROL = 7 * LINE
EPOCH_MASK = 0x3FFFFFFF  # EPOCH counts tasks modulo 2**30 (an int32 word)
CAPACITY = 4096  # task blocks one pool can serve (one per MoE layer and device)
IDLE_SPIN_S = 0.02  # spin this long after the last task before napping
NAP_US = 50
SLOW_WAIT_S = 0.001  # a barrier or ring that waits this long yields its core (more threads than cores)
_X86 = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _load(typingctx, address):
    """*(int32*)address, with acquire order."""
    sig = types.int32(types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.load_atomic(ptr, "acquire", 4)

    return sig, codegen


@intrinsic
def _store(typingctx, address, value):
    """*(int32*)address = value, with release order."""
    sig = types.void(types.int64, types.int32)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        builder.store_atomic(args[1], ptr, "release", 4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fetch_add(typingctx, address, value):
    """*(int32*)address += value atomically; -> the value before."""
    sig = types.int32(types.int64, types.int32)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "acq_rel")

    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 `pause`: the core's sibling and the memory bus get the cycles); nothing elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _wait_while(address, value, slow, yield_fn):
    """Spin until *address != value; after `slow` ticks, yield the core between looks."""
    start = _ticks()
    while _load(address) == value:
        _pause()
        if _ticks() - start > slow:
            _call_int(yield_fn, 0)


@njit(cache=True, inline="always")
def _barrier(ctl, workers, slow, yield_fn):
    gen = _load(ctl + 4 * GEN)
    if _fetch_add(ctl + 4 * GATHERED, 1) == workers - 1:
        _store(ctl + 4 * GATHERED, 0)
        _store(ctl + 4 * GEN, gen + 1)
    else:
        _wait_while(ctl + 4 * GEN, gen, slow, yield_fn)


@njit(cache=True, inline="always")
def _share(n, me, workers):
    return me * n // workers, (me + 1) * n // workers


@njit(cache=True)
def _run_share(f, me, workers, ctl, slow, yield_fn):
    """This worker's share of the task block f (see the module docstring)."""
    H, Y = host_task.H, host_task.Y
    dim, inter, n_experts, top_k = f[host_task.DIM], f[host_task.INTER], f[host_task.N_EXPERTS], f[host_task.TOP_K]
    x = carray(_pointer(f[host_task.X], np.float32), (1, dim))
    ids = carray(_pointer(f[host_task.IDS], np.int64), (top_k,))
    g_flat = carray(_pointer(f[host_task.GATE], np.uint8), (n_experts * inter * f[host_task.GATE_ROW],))
    u_flat = carray(_pointer(f[host_task.UP], np.uint8), (n_experts * inter * f[host_task.UP_ROW],))
    d_flat = carray(_pointer(f[host_task.DOWN], np.uint8), (n_experts * dim * f[host_task.DOWN_ROW],))
    g_row, u_row, d_row = f[host_task.GATE_ROW], f[host_task.UP_ROW], f[host_task.DOWN_ROW]
    k_gate, k_up, k_down = f[host_task.GATE_KIND], f[host_task.UP_KIND], f[host_task.DOWN_KIND]
    h = carray(_pointer(f[H], np.float32), (top_k, inter))
    parts_mode = f[host_task.MODE] == host_task.PARTS
    at = np.empty(top_k, dtype=np.int64)  # rows k of the experts the CPU computes, in k order
    n = 0
    if parts_mode:
        slots = carray(_pointer(f[host_task.SLOTS], np.int32), (n_experts,))
        for k in range(top_k):
            if slots[ids[k]] < 0:
                at[n] = k
                n += 1
    else:
        for k in range(top_k):
            at[k] = k
        n = top_k
    # 1. gate and up rows -> h[g] for the g-th expert served
    lo, hi = _share(n * inter, me, workers)
    if hi > lo:
        xq, xr, xd, xk, xneg, x16 = raw_int8._prepared(x, (1 << k_gate) | (1 << k_up))
        q0, r0, d0, k0, neg0, s0 = raw_int8._first(xq, xr, xd, xk, xneg, x16)
        for flat in range(lo, hi):
            g, r = flat // inter, flat % inter
            row = ids[at[g]] * inter + r
            a = raw_int8._dot(k_gate, g_flat, row * g_row, dim, q0, r0, d0, k0, neg0, s0)
            b = raw_int8._dot(k_up, u_flat, row * u_row, dim, q0, r0, d0, k0, neg0, s0)
            h[g, r] = a / (f32(1.0) + np.exp(-a)) * b  # silu(gate) * up
    _barrier(ctl, workers, slow, yield_fn)
    # 2. down rows -> y (SUM) or out's rows (PARTS)
    if parts_mode:
        y = carray(_pointer(f[host_task.OUT], np.float32), (top_k, dim))
    else:
        y = carray(_pointer(f[Y], np.float32), (top_k, dim))
    lo, hi = _share(n * dim, me, workers)
    ready = -1
    hq, hd, hqs, hr, hk, hneg, h16 = raw_int8._buffers(1, inter)
    q0, r0, d0, k0, neg0, s0 = raw_int8._first(hq.view(np.uint8), hr.view(np.uint8), hd, hk, hneg, h16)
    for flat in range(lo, hi):
        g, r = flat // dim, flat % dim
        if g != ready:  # this expert's hidden state rounded as `ffn` rounds it
            raw_int8.prepare(h[g:g + 1], hq, hd, hqs, hr, hk, hneg, h16, 1 << k_down)
            ready = g
        y[at[g], r] = raw_int8._dot(k_down, d_flat, (ids[at[g]] * dim + r) * d_row, inter, q0, r0, d0, k0, neg0, s0)
    if parts_mode:
        return
    _barrier(ctl, workers, slow, yield_fn)
    # 3. out = sum_k w[k] * y[k], in k order
    w = carray(_pointer(f[host_task.WEIGHTS], np.float32), (top_k,))
    out = carray(_pointer(f[host_task.OUT], np.float32), (dim,))
    lo, hi = _share(dim, me, workers)
    for j in range(lo, hi):
        out[j] = f32(0.0)
    for g in range(top_k):
        wg = w[g]
        for j in range(lo, hi):
            out[j] += y[g, j] * wg


@njit(nogil=True, cache=True)
def _worker(ctl, table, me, workers, ticks_per_s, idle_spin_s, nap_fn, yield_fn):
    """One pool thread: run each task rung at DOOR, until STOP. -> tasks run."""
    slow = np.int64(SLOW_WAIT_S * ticks_per_s)
    idle_after = np.int64(idle_spin_s * ticks_per_s)
    done_tasks = 0
    while True:
        last = _ticks()
        while True:  # wait for a task
            door = _load(ctl + 4 * DOOR)
            if door != 0:
                break
            if _load(ctl + 4 * STOP) != 0:
                return done_tasks
            _pause()
            if _ticks() - last > idle_after:
                _call_int(nap_fn, NAP_US)
        f = carray(_pointer(table[door - 1], np.int64), (host_task.N_FIELDS,))
        if me == 0:
            f[host_task.STARTED] = _ticks()
        _run_share(f, me, workers, ctl, slow, yield_fn)
        done_tasks += 1
        if _fetch_add(ctl + 4 * ARRIVED, 1) == workers - 1:  # the last one out closes the task
            end = _ticks()
            f[host_task.ENDED] = end
            f[host_task.CYCLES] += end - f[host_task.STARTED]
            f[host_task.RUNS] += 1
            _store(ctl + 4 * ARRIVED, 0)
            _store(ctl + 4 * DOOR, 0)
            _store(ctl + 4 * EPOCH, done_tasks & EPOCH_MASK)
            _store(ctl + 4 * DONE, 1)
        else:
            _wait_while(ctl + 4 * EPOCH, (done_tasks - 1) & EPOCH_MASK, slow, yield_fn)


@njit(nogil=True, cache=True)
def _ring(ctl, value, ticks_per_s, yield_fn):
    """Ring for task `value` and wait until it is done (what the stream does, for the CPU standing in)."""
    _store(ctl + 4 * DOOR, value)
    _wait_while(ctl + 4 * DONE, 0, np.int64(SLOW_WAIT_S * ticks_per_s), yield_fn)
    _store(ctl + 4 * DONE, 0)


def _libc_address(name: str) -> int:
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value


class HostPool:
    """`workers` threads serving task blocks registered with `add`, rung by index (`run` here, `door_address` and
    `done_address` from a stream). control: int32 words (see the module docstring), pinned where `pin`; idle_spin_s:
    how long a worker spins after a task before it naps."""

    def __init__(self, workers: int, pin: bool = False, idle_spin_s: float = 0.0):
        import torch  # pinned memory the GPU can write

        if workers < 1:
            raise ValueError(f"a host pool needs at least one worker, got {workers}")
        self.workers = workers
        self._control = torch.zeros(N_CONTROL, dtype=torch.int32, pin_memory=pin)
        self.control = self._control.numpy()
        self.table = np.zeros(CAPACITY, dtype=np.int64)
        self.blocks: list[np.ndarray] = []  # kept alive while the pool may read them
        self.ticks_per_s = host_task.cycles_per_second(0.02)
        self._lock = threading.Lock()
        self.door_address = self.control.ctypes.data + 4 * DOOR
        self.done_address = self.control.ctypes.data + 4 * DONE
        nap, yield_ = _libc_address("usleep"), _libc_address("sched_yield")
        self.threads = [threading.Thread(target=_worker, name=f"hybridmoe-host-{i}", daemon=True,
                                         args=(self.control.ctypes.data, self.table, i, workers, self.ticks_per_s,
                                               idle_spin_s, nap, yield_))
                        for i in range(workers)]
        self._yield = yield_
        # Compile (or load) the workers' loop here, where an error can be raised: a thread that failed to start it
        # would leave a stream waiting for ever. With STOP set it returns at once.
        self.control[STOP] = 1
        _worker(self.control.ctypes.data, self.table, 0, workers, self.ticks_per_s, idle_spin_s, nap, yield_)
        self.control[STOP] = 0
        for t in self.threads:
            t.start()

    def add(self, block: np.ndarray) -> int:
        """Register a task block (its H and Y scratch set, see `host_task.fill_block`); -> the value to ring."""
        if not (block[host_task.H] and (block[host_task.Y] or block[host_task.MODE] == host_task.PARTS)):
            raise ValueError("a pool's task block needs its h and y scratch (host_task.fill_block(..., pool=True))")
        with self._lock:
            if len(self.blocks) >= CAPACITY:
                raise RuntimeError(f"a host pool serves at most {CAPACITY} task blocks")
            self.table[len(self.blocks)] = block.ctypes.data
            self.blocks.append(block)
            return len(self.blocks)

    def run(self, value: int) -> None:
        """Ring for a registered task and wait for it, from this thread (the GIL is released meanwhile)."""
        with self._lock:  # one ring at a time: the control words serve one task
            _ring(self.control.ctypes.data, value, self.ticks_per_s, self._yield)

    def stop(self) -> None:
        self.control[STOP] = 1
        for t in self.threads:
            t.join(timeout=1.0)


_POOLS: dict[bool, HostPool] = {}


def shared_pool(workers: int, gpu: bool) -> HostPool:
    """The process's pool for GPU streams (pinned control words, spinning between layers) or for the CPU standing
    in (napping), started on first use with `workers` threads; later calls get that pool."""
    if gpu not in _POOLS:
        _POOLS[gpu] = HostPool(workers, pin=gpu, idle_spin_s=IDLE_SPIN_S if gpu else 0.0)
        atexit.register(_POOLS[gpu].stop)
    return _POOLS[gpu]


def default_workers() -> int:
    """One per core, less the core of the thread that rings (it spins while it waits for the GPU or the pool)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)
