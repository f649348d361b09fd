"""The disk tier of the CPU engine: a GGUF file whose routed experts do not fit in the memory budget keeps its hottest
experts in RAM on purpose and reads the others from disk ahead of need.

- Budget (`memory_budget`): the memory cgroup's limit (v1 `memory.limit_in_bytes`, v2 `memory.max`; the page cache
  counts against it) or the RAM available, whichever is lower, less what the process holds besides the file's pages.
- Resident set: the experts with the most routed tokens (counted here, or read from a popularity file) have their
  pages locked in RAM (mlock through a read-only shared mapping of the file), re-chosen every REPIN_STEPS decode
  steps. The non-expert weights are private copies already (the CPU kernels' repacked layout).
- Reads: a few threads pread experts' byte ranges into the page cache, one expert per numba call that releases the
  GIL, so that reads go on while the CPU kernels hold it. First what the layer about to run needs, then the router's
  prediction for the next layer (made from this layer's MoE input, before its experts run, so that the reads overlap
  them), never more bytes ahead of use than the window. A prefill streams a layer's experts in the order they are
  computed, within the same window.

The reads are addressed by (layer, expert ids) from anywhere: `ExpertRanges.spans(layer, experts)` gives the mapped
addresses and lengths, so a caller without Python (a CUDA host function) can start the same reads with
madvise(MADV_WILLNEED) on them.
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import mmap
import os
import resource
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelFileError
from .popularity import read_popularity, write_popularity
from .prefetch import Prefetcher

READERS = 4  # threads reading; each keeps one expert's ranges (split into the device's largest requests) in flight
CHUNK = 8 << 20  # bytes per pread call at most (each thread's buffer)
WINDOW_LAYERS = 2  # the window holds the layer computing and the next one's prediction: (k + margin) experts each
REPIN_STEPS = 16  # decode steps between choices of the resident set
DECODE_TOKENS = 4  # up to this many tokens a layer's reads are awaited together (decode); more: streamed (prefill)
MIB = 1 << 20
MADV_DONTNEED = 4
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


# --- the budget ---------------------------------------------------------------------------------------------------
def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit on this process's cgroup path (v1 or v2), or None where there is none."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        elif controllers == "" and "memory" in _read(Path(root) / "cgroup.controllers").split():  # v2
            base, name = Path(root), "memory.max"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            value = _read(here / name)
            if value.isdigit() and int(value) < UNLIMITED:
                limits.append(int(value))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(limits) if limits else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def anon_bytes() -> int:
    """Memory this process holds that is not file pages (RssAnon), which the page cache cannot have."""
    for line in _read(Path("/proc/self/status")).splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    import psutil
    return psutil.Process().memory_info().rss


def held_bytes(files: list[Path]) -> int:
    """What this process keeps in memory besides the pages of `files` (the model): its own memory and the file
    pages it has mapped from elsewhere (libraries' code, compiled kernels), which it keeps needing."""
    names = {str(Path(f).resolve()) for f in files}
    total, in_model = 0, False
    for line in _read(Path("/proc/self/smaps")).splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping: address range, perms, offset, dev
            in_model = len(head) == 6 and head[5] in names
        elif line.startswith("Rss:") and not in_model:
            total += int(line.split()[1]) * 1024
    return total or anon_bytes()


def memory_budget(explicit: int | None = None) -> int:
    """Bytes the process may hold, file pages included: `explicit`, else the lower of the cgroup's limit and the RAM
    available (with what the process holds already)."""
    if explicit is not None:
        return int(explicit)
    import psutil
    room = psutil.virtual_memory().available + anon_bytes()
    limit = cgroup_memory_limit()
    return room if limit is None else min(limit, room)


def read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io), or None where that is unknown."""
    import psutil
    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error, OSError):
        return None


# --- byte ranges --------------------------------------------------------------------------------------------------
def _file_offset(a: np.ndarray) -> int:
    """Where a view of a memory-mapped file starts in the file."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    if not isinstance(base, np.memmap):
        raise ValueError("not a view of a memory-mapped file")
    return a.ctypes.data - base.ctypes.data + base.offset


class ExpertRanges:
    """Each (layer, expert)'s byte ranges: one per projection (gate, up, down), a contiguous slice of the stacked
    `ffn_*_exps` tensor, as (file, offset, length) and as the address where the engine's mapping holds it."""

    def __init__(self, layers: dict):
        """layers: layer -> (gate, up, down) GGUFTensor, each raw [E, ...] a view of its file's mapping."""
        self.files: list[Path] = []
        self.layers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for layer, projs in layers.items():
            fds, offsets, sizes, addrs = [], [], [], []
            for t in projs:
                if t.file not in self.files:
                    self.files.append(Path(t.file))
                one = t.raw[0].nbytes
                fds.append(self.files.index(Path(t.file)))
                offsets.append(_file_offset(t.raw))
                addrs.append(t.raw.ctypes.data)
                sizes.append(one)
            self.layers[layer] = tuple(np.array(v, dtype=np.int64) for v in (fds, offsets, sizes, addrs))

    def expert_nbytes(self, layer: int) -> int:
        return int(self.layers[layer][2].sum())

    def spans(self, layer: int, experts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(file index, file offset, length, mapped address) of each range of these experts, int64 [3 * n]."""
        fds, offsets, sizes, addrs = self.layers[layer]
        e = np.asarray(list(experts), dtype=np.int64)[:, None]
        return (np.broadcast_to(fds, (len(e), 3)).ravel(), (offsets + e * sizes).ravel(),
                np.broadcast_to(sizes, (len(e), 3)).ravel(), (addrs + e * sizes).ravel())


# --- reading ------------------------------------------------------------------------------------------------------
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.CDLL(None, use_errno=True)
    lib.pread.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)
    lib.pread.restype = ctypes.c_ssize_t
    lib.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    lib.mincore.restype = ctypes.c_int
    for name in ("mlock", "munlock"):
        getattr(lib, name).argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        getattr(lib, name).restype = ctypes.c_int
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    lib.madvise.restype = ctypes.c_int
    return lib


_LIBC = _libc()
_KERNELS = None


def _kernels():
    """(read, resident): numba functions over libc's pread and mincore, compiled on first use (they hold function
    addresses, so they are not cached on disk)."""
    global _KERNELS
    if _KERNELS is None:
        from numba import njit
        pread, mincore, page = _LIBC.pread, _LIBC.mincore, mmap.PAGESIZE

        @njit(nogil=True)
        def resident(addrs, sizes, vec):
            """Whether every page of every range is in memory (vec: a scratch byte per page)."""
            for i in range(addrs.size):
                start = addrs[i] // page * page
                n = (addrs[i] + sizes[i] - start + page - 1) // page
                if mincore(start, n * page, vec.ctypes.data) != 0:
                    return False
                for j in range(n):
                    if vec[j] & 1 == 0:
                        return False
            return True

        @njit(nogil=True)
        def read(fds, offsets, sizes, addrs, buf, vec):
            """pread each range not wholly in memory into buf (and so into the page cache); the bytes read, or
            -1 - i where range i could not be read."""
            total = 0
            for i in range(offsets.size):
                if resident(addrs[i:i + 1], sizes[i:i + 1], vec):
                    continue
                off, left = offsets[i], sizes[i]
                while left > 0:
                    n = pread(fds[i], buf.ctypes.data, min(left, buf.size), off)
                    if n <= 0:
                        return -1 - i
                    off += n
                    left -= n
                    total += n
            return total

        _KERNELS = read, resident
    return _KERNELS


QUEUED, READING, DONE, DROPPED = range(4)
# Priorities: what a layer needs now, dropping what it has used, the next layer's prediction, the resident set.
DEMAND, RELEASE, PREDICTED, PIN = range(4)


@dataclass(eq=False)
class Job:
    key: tuple[int, int]  # (layer, expert)
    nbytes: int
    kind: int
    state: int = QUEUED
    used: bool = False  # consumed by its layer: its bytes leave the window when it is no longer read
    read: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    keys: list = field(default_factory=list)  # RELEASE: the experts to drop
    error: str | None = None  # why its read failed: the engine raises it instead of touching the pages


class Reader:
    """Threads that read jobs' byte ranges into the page cache (or lock them there, for PIN jobs), most urgent first.
    Callbacks: on_done(job) under the lock, when a job ends."""

    def __init__(self, ranges: ExpertRanges, threads: int = READERS, on_done=None):
        self.ranges, self.on_done = ranges, on_done
        self.fds = []
        for f in ranges.files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly the ranges asked for, no read-around
            self.fds.append(fd)
        # A read-only shared mapping of each file for mlock: locking the engine's copy-on-write mapping would make
        # private copies of the pages.
        self.maps = [np.frombuffer(mmap.mmap(fd, 0, prot=mmap.PROT_READ), np.uint8) for fd in self.fds]
        self.lock = threading.Condition()
        self.queue: list = []
        self.seq = itertools.count()
        self.closed = False
        self.max_pages = int(max(r[2].max() for r in ranges.layers.values())) // mmap.PAGESIZE + 2
        _kernels()  # compiled here, not in the first reader thread
        self.threads = [threading.Thread(target=self._work, name=f"hybridmoe-disk-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, job: Job, kind: int) -> None:
        with self.lock:
            heapq.heappush(self.queue, (kind, next(self.seq), job))
            self.lock.notify()

    def _work(self) -> None:
        read, _ = _kernels()
        buf = np.empty(min(CHUNK, self.max_pages * mmap.PAGESIZE), np.uint8)
        vec = np.empty(self.max_pages, np.uint8)
        while True:
            with self.lock:
                while not self.closed and not self.queue:
                    self.lock.wait()
                if self.closed:
                    return
                _, _, job = heapq.heappop(self.queue)
                if job.state != QUEUED:  # taken already (an earlier entry), or dropped
                    continue
                job.state = READING
            try:
                if job.kind == RELEASE:
                    self._drop(job.keys)
                    continue
                got = self._run(job, buf, vec)
            except Exception as e:  # noqa: BLE001 - a job that ends without a result would hang its waiter
                got, job.error = -1, f"{self.ranges.files[0]}: reading expert {job.key[1]} of layer {job.key[0]} " \
                                     f"failed ({type(e).__name__}: {e})"
            with self.lock:
                job.read, job.state = max(0, got), DONE
                done = self.on_done() if self.on_done is not None else None
                if done is not None:
                    done(job)
            job.done.set()

    def _run(self, job: Job, buf, vec) -> int:
        """Read one expert's ranges (and lock them, for a PIN job): bytes read, or -1 with job.error set, or -1
        alone where mlock was refused."""
        read, _ = _kernels()
        fds_index, offsets, sizes, addrs = self.ranges.spans(job.key[0], [job.key[1]])
        got = read(np.array([self.fds[i] for i in fds_index], dtype=np.int64), offsets, sizes, addrs, buf, vec)
        if got < 0:
            i = -1 - got
            job.error = self._why(job, int(fds_index[i]), int(offsets[i]), int(sizes[i]))
            return -1
        if job.kind == PIN:  # read first as the others are: mlock's own faults read around each page, slowly
            return self._lock_pages(fds_index, offsets, sizes)
        return got

    def _why(self, job: Job, f: int, off: int, size: int) -> str:
        """One line on a failed read, from the same read done again by Python (which keeps errno)."""
        where = f"{self.ranges.files[f]}: reading expert {job.key[1]} of layer {job.key[0]} (bytes {off}..{off + size})"
        try:
            end = os.fstat(self.fds[f]).st_size
            if end < off + size:
                return f"{where}: the file now ends at byte {end}; it was truncated or replaced while in use"
            os.pread(self.fds[f], min(size, CHUNK), off)
        except OSError as e:
            return f"{where} failed: {e.strerror or e}; check the disk (dmesg) or copy the file again"
        return f"{where} failed; check the disk (dmesg) or copy the file again"

    def _lock_pages(self, fds, offsets, sizes) -> int:
        """mlock one expert's ranges through the shared mappings; -1 on refusal."""
        for fd, off, size in zip(fds, offsets, sizes):
            addr = self.maps[fd].ctypes.data + int(off)
            if _LIBC.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(int(size))) != 0:
                return -1
        return int(sizes.sum())

    def _drop(self, keys: list[tuple[int, int]]) -> None:
        """Unmap these experts' whole pages from the engine's mapping and drop them from the page cache (pages that
        are locked, or mapped elsewhere, stay)."""
        page = mmap.PAGESIZE
        for layer, e in keys:
            fds, offsets, sizes, addrs = self.ranges.spans(layer, [e])
            for fd, off, size, addr in zip(fds, offsets, sizes, addrs):
                lo, hi = -(-int(addr) // page) * page, (int(addr) + int(size)) // page * page
                if hi > lo:
                    _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
                    os.posix_fadvise(self.fds[fd], int(off) + lo - int(addr), hi - lo, os.POSIX_FADV_DONTNEED)

    def unlock(self, layer: int, e: int) -> None:
        fds, offsets, sizes, _ = self.ranges.spans(layer, [e])
        for fd, off, size in zip(fds, offsets, sizes):
            _LIBC.munlock(ctypes.c_void_p(self.maps[fd].ctypes.data + int(off)), ctypes.c_size_t(int(size)))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=60)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# --- the tier -----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class DiskPlan:
    """How a budget is spent: experts that fit in memory at once (pinned), the window of reads ahead."""
    budget: int
    held: int  # what the process holds besides the file's pages
    headroom: int  # kept free for growth (KV cache, compiled kernels, activations)
    window: int
    pin: int
    expert_bytes: int  # all routed experts

    @property
    def fits(self) -> bool:
        return self.expert_bytes <= self.budget - self.held - self.headroom

    def describe(self) -> str:
        gib = 1 << 30
        return (f"routed experts ({self.expert_bytes / gib:.1f} GiB) exceed the memory budget "
                f"({self.budget / gib:.1f} GiB, {self.held / gib:.1f} GiB held by the engine): "
                f"{self.pin / gib:.2f} GiB of the most used experts stay in RAM, the rest is read from disk ahead of "
                f"use ({self.window / MIB:.0f} MiB ahead at most)")


def plan_budget(budget: int, held: int, expert_bytes: int, window: int) -> DiskPlan:
    headroom = max(256 * MIB, budget // 8)
    pin = max(0, budget - held - headroom - window)
    return DiskPlan(budget, held, headroom, window, pin, expert_bytes)


class DiskTier:
    """Reads and residency of one QuantStore's experts under a memory budget (see the module's docstring). The
    Experts object calls `before(layer, x, ids)` as a layer's experts start, and `need(layer, e)` before each expert
    of a streamed (prefill) layer."""

    def __init__(self, model, store, plan: DiskPlan, prefetch: bool = True, margin: int = 2,
                 threads: int = READERS):
        if _LIBC is None:
            raise ConfigError("the disk tier needs Linux (mincore, pread, mlock)")
        self.model, self.store, self.plan = model, store, plan
        self.ranges = ExpertRanges(store.layers)
        self.reader = Reader(self.ranges, threads, on_done=weakref.WeakMethod(self._done))
        weakref.finalize(self, self.reader.close)  # the reader's threads end with the tier
        self.jobs: dict[tuple[int, int], Job] = {}  # reads for the layer running and the next one
        self.ahead = 0  # bytes of those jobs, and of jobs used but still being read: the window's fill
        self.stream: dict[int, list[int]] = {}  # prefill: layer -> experts not yet asked for, in compute order
        self.counts = {layer: np.zeros(n, np.int64) for layer, n in store.n_experts.items()}
        self.pinned: set[tuple[int, int]] = set()
        self.pinning: dict[tuple[int, int], Job] = {}
        self.pin_refused = False
        self.steps = 0
        self.first = min(store.layers)
        self.served = [0, 0, 0]  # experts found in memory, read ahead of need, waited for
        self.wait_s = 0.0
        self.computed: list[tuple[int, int]] = []  # experts of the layer running: released once it is done
        self.unused: list[tuple[int, int]] = []  # read ahead in vain: released with them
        self.tier_read = 0  # bytes the reader threads read (the rest of disk_bytes: page faults)
        self.notices = [plan.describe()]
        self._read0 = read_bytes()
        self.prefetcher = Prefetcher(model, margin, on_predict=self.predict) if prefetch else None
        # The MoE input of layer L is its norm weight times the residual's direction; the next layer's prediction
        # starts from that direction (RMSNorm is scale-invariant), so dividing by L's norm weight recovers it.
        self.norm_w = {}
        for layer in store.layers:
            w = model.layers[layer].ffn_norm.weight.detach().float()
            self.norm_w[layer] = torch.where(w == 0, torch.ones_like(w), w)
        _, self._resident = _kernels()
        self._vec = np.empty(self.reader.max_pages, np.uint8)
        _raise_memlock()

    # -- the engine's calls --------------------------------------------------------------------------------------
    def before(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Layer `layer`'s experts `ids` [N, K] are about to run on x [N, D] (its MoE input, on the host)."""
        ids_host = ids.cpu()  # host sync: the experts to read are decided on the host
        experts = ids_host.unique().tolist()
        np.add.at(self.counts[layer], ids_host.flatten().numpy(), 1)
        if layer == self.first:
            self._step()
        decode = x.shape[0] <= DECODE_TOKENS
        with self.reader.lock:
            self._use_others(layer, set(experts))
            self.stream.clear()
            missing = self._classify(layer, experts)
            if decode:
                for e in missing:
                    self._ask(layer, e, DEMAND)
                waiting = [self.jobs[(layer, e)] for e in missing]
            else:  # prefill: read in the order run_experts computes them, within the window (need() moves it on)
                self.stream[layer] = missing
        self._release(self.computed + self.unused)  # the previous layer's
        self.computed, self.unused = [(layer, e) for e in experts], []
        if self.prefetcher is not None:
            self.prefetcher.record(layer, set(experts))
            if decode and layer + 1 in self.store.layers:
                self.prefetcher.observe(layer, x / self.norm_w[layer])  # predicts layer + 1: predict() below
                self.prefetcher.collect(layer + 1)
        if decode:
            self._wait(waiting)
        else:
            self._top_up(layer)

    def need(self, layer: int, e: int) -> None:
        """A streamed layer is about to compute expert e (experts come in ascending order): wait for its read; the
        experts before it have been computed, so their bytes leave the window."""
        order = self.stream.get(layer)
        if order is None:
            return
        done = [key for key in self.computed if key[1] < e]
        self._release(done)
        self.computed = self.computed[len(done):]
        with self.reader.lock:
            for key, job in list(self.jobs.items()):
                if key[0] == layer and key[1] < e:
                    self._use(job)
            if order and order[0] == e:
                self._ask(layer, order.pop(0), DEMAND)
            job = self.jobs.get((layer, e))
        self._top_up(layer)
        if job is not None:
            self._wait([job])

    def predict(self, layer: int, experts: list[int]) -> None:
        """The router's prediction for `layer` (most confident first): read what is not in memory, while the window
        has room."""
        nbytes = self.ranges.expert_nbytes(layer)
        with self.reader.lock:
            for e in experts:
                if (layer, e) in self.pinned or (layer, e) in self.jobs:
                    continue
                if self.ahead + nbytes > self.plan.window:
                    break
                self._ask(layer, e, PREDICTED)

    def take_stats(self) -> dict:
        """Bytes read from disk, experts served from memory (resident), read ahead and waited for, since the last
        call; notices once."""
        got = read_bytes()
        out = {"disk_bytes": 0 if got is None or self._read0 is None else got - self._read0,
               "experts_in_memory": self.served[0], "experts_read_ahead": self.served[1],
               "experts_waited": self.served[2], "disk_wait_s": self.wait_s, "pinned_experts": len(self.pinned)}
        self._read0, self.served, self.wait_s = got, [0, 0, 0], 0.0
        if self.prefetcher is not None:
            q = self.prefetcher.summary()
            if q:
                out["prefetch_recall"] = sum(v["recall_k_margin"] for v in q.values()) / len(q)
        if self.notices:
            out["notices"], self.notices = self.notices, []
        return out

    # -- popularity and the resident set -------------------------------------------------------------------------
    def save_popularity(self, path: str | Path) -> None:
        """Tokens routed to each expert so far, in the offload engine's popularity file format."""
        write_popularity(path, {(layer, e): int(n) for layer, c in self.counts.items()
                                for e, n in enumerate(c) if n})

    def load_popularity(self, path: str | Path) -> int:
        """Add a saved popularity file's counts, and lock the most used experts in RAM now (reading them).
        Returns experts pinned."""
        for (layer, e), n in read_popularity(path).items():
            if layer in self.counts and 0 <= e < len(self.counts[layer]):
                self.counts[layer][e] += n
        before = len(self.pinned)
        for job in self._repin():
            job.done.wait()
            _check(job)
        return len(self.pinned) - before

    def _step(self) -> None:
        self.steps += 1
        if self.steps % REPIN_STEPS == 0:
            self._repin()

    def _repin(self) -> list[Job]:
        """Choose the resident set again from the counts: unlock experts that left it, queue locks for new ones
        (read at the lowest priority)."""
        if self.pin_refused:
            return []
        ranked = sorted(((int(n), layer, e) for layer, c in self.counts.items() for e, n in enumerate(c) if n),
                        reverse=True)
        want, room = set(), self.plan.pin
        for _, layer, e in ranked:
            room -= self.ranges.expert_nbytes(layer)
            if room < 0:
                break
            want.add((layer, e))
        jobs = []
        with self.reader.lock:
            for key in self.pinned - want:
                self.reader.unlock(*key)
                self.pinned.discard(key)
            for key in set(self.pinning) - want:
                self.pinning.pop(key).state = DROPPED
            for key in want - self.pinned - set(self.pinning):
                job = self.pinning[key] = Job(key, self.ranges.expert_nbytes(key[0]), PIN)
                jobs.append(job)
                self.reader.submit(job, PIN)
        return jobs

    # -- bookkeeping (under the reader's lock) -------------------------------------------------------------------
    def _done(self, job: Job) -> None:
        self.tier_read += job.read
        if job.kind != PIN:
            if job.used:
                self.ahead -= job.nbytes
                self._release([job.key])
            return
        if self.pinning.get(job.key) is job:
            del self.pinning[job.key]
        if job.read > 0:
            self.pinned.add(job.key)
        elif job.error is None and not self.pin_refused:
            self.pin_refused = True
            self.notices.append(f"could not lock experts in RAM (mlock refused after {len(self.pinned)} experts; "
                                "RLIMIT_MEMLOCK, see `ulimit -l`): the page cache keeps what it can")

    def _ask(self, layer: int, e: int, kind: int) -> None:
        job = self.jobs.get((layer, e))
        if job is None:
            job = self.jobs[(layer, e)] = Job((layer, e), self.ranges.expert_nbytes(layer), kind)
            self.ahead += job.nbytes
        elif job.state != QUEUED or job.kind <= kind:
            return
        job.kind = kind
        self.reader.submit(job, kind)  # a job asked for again more urgently is queued twice; it is read once

    def _use(self, job: Job) -> None:
        """Its layer is done with this job: it leaves the window and its pages leave memory (now, or when its read
        ends), whether its expert ran or was predicted in vain."""
        del self.jobs[job.key]
        job.used = True
        if job.state == QUEUED:
            job.state = DROPPED
            job.done.set()
        if job.state != READING:
            self.ahead -= job.nbytes
        if job.state == DONE:
            self.unused.append(job.key)

    def _use_others(self, layer: int, needed: set[int]) -> None:
        """Layer `layer` starts: jobs of other layers are done with, and so are its predicted experts that it does
        not use and that are not being read yet."""
        for (lay, e), job in list(self.jobs.items()):
            if lay != layer or (e not in needed and job.state == QUEUED):
                self._use(job)

    def _classify(self, layer: int, experts: list[int]) -> list[int]:
        """Count each expert as served from memory (pinned or cached), read ahead (a finished read), or waited
        for; returns those not in memory yet."""
        missing = []
        for e in experts:
            job = self.jobs.get((layer, e))
            if job is not None:
                _check(job)
                kind = (0 if job.read == 0 else 1) if job.state == DONE else 2
            elif (layer, e) in self.pinned:
                kind = 0
            else:
                _, _, sizes, addrs = self.ranges.spans(layer, [e])
                kind = 0 if self._resident(addrs, sizes, self._vec) else 2
            self.served[kind] += 1
            if kind == 2:
                missing.append(e)
        return missing

    def _release(self, keys: list[tuple[int, int]]) -> None:
        """Used experts that are not pinned leave memory at once (a reader thread drops them). The page cache then
        stays below the budget instead of filling it, so that reads never wait for the kernel to reclaim memory (nor
        evict the libraries' code); such an expert is read again if it is needed again."""
        keys = [k for k in keys if k not in self.pinned]
        if keys:
            self.reader.submit(Job(keys[0], 0, RELEASE, keys=keys), RELEASE)

    def _top_up(self, layer: int) -> None:
        order = self.stream.get(layer)
        nbytes = self.ranges.expert_nbytes(layer)
        with self.reader.lock:
            while order and (self.ahead + nbytes <= self.plan.window or not self.jobs):
                self._ask(layer, order.pop(0), DEMAND)

    def _wait(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        for job in jobs:
            job.done.wait()
            _check(job)
        self.wait_s += time.perf_counter() - t0


def _check(job: Job) -> None:
    """A failed read stops the engine with its cause, before a kernel touches the pages (a truncated file's
    missing pages would kill the process with SIGBUS)."""
    if job.error is not None:
        raise ModelFileError(job.error)


def _raise_memlock() -> None:
    """Locking pages needs RLIMIT_MEMLOCK room (root has it): raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            pass


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} B"


def attach(model, experts, budget: int | None = None, prefetch: bool = True, margin: int = 2) -> DiskTier | None:
    """Give a QuantExperts model the disk tier when its routed experts exceed the memory budget (None: this
    process's cgroup limit or the RAM available); None when they fit, and nothing changes."""
    store = experts.store
    if _LIBC is None or store.tier != "mmap" or store.repack:
        return None
    total = sum(sum(t.nbytes for t in projs) for projs in store.layers.values())
    top_k = model.layers[min(store.layers)].ffn.spec.top_k
    window = WINDOW_LAYERS * (top_k + (margin if prefetch else 0)) * store.expert_nbytes()
    files = sorted({Path(t.file) for projs in store.layers.values() for t in projs})
    if budget is not None:
        other = sum(f.stat().st_size for f in files) - total  # attention, dense layers, embeddings, head
        if budget < other + window:
            raise ConfigError(f"--memory-budget {_size(budget)}: below the model's weights besides the routed "
                              f"experts ({_size(other)}) plus the reads in flight ({_size(window)}); give at least "
                              f"{_size(other + window)} (more keeps the most used experts in RAM)")
    plan = plan_budget(memory_budget(budget), held_bytes(files), total, window)
    if plan.fits:
        return None
    experts.disk = DiskTier(model, store, plan, prefetch, margin)
    return experts.disk
