"""One decode MoE layer's CPU work, as the host node runs it (`ffn_raw_int8` with routing weights: K experts of a
layer, the file's bytes read in place, 8-bit activations), against the machine's read bandwidth, per thread count.

Weights cycle through enough layers that the caches cannot hold them, and each call picks K random experts, as a
decode step does. GB/s counts the experts' bytes as stored. --memory places the weights in numpy's memory (default),
page-locked memory as the pinned tier allocates it (CUDA's host allocator), anonymous memory advised to use
transparent huge pages, or a file's pages mapped from the page cache (as decode reads a GGUF's experts: `file`); the
machine's huge-page setting is printed. "cached" runs the same K experts again and again (from
the caches where they fit: if that is not much faster, the kernel is bound by its own work, not by memory); "1
expert" and "1 cached" the same for one expert (a call's fixed cost shows there).

    python bench/cpu_layer.py [--shape qwen3_moe|deepseek_v3] [--threads 4,8,16] [--gib 2]
    python bench/cpu_layer.py --host-node --threads 15,16 --chunks 0,2,8     # on a GPU machine

--host-node: the same layers as a decode step runs them, one host function per layer on a CUDA stream, 48 in a
row while this thread waits on the stream (spinning, as a step's sampler does), per thread count and parallel chunk
size (0: numba's static split).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridmoe.kernels import cpu  # noqa: E402
from hybridmoe.quant import get_format, random_blocks  # noqa: E402

SHAPES = {"qwen3_moe": (2048, 768, 128, 8), "deepseek_v3": (7168, 2048, 256, 8)}  # D, I, E, K


def stacked(rng, n_experts: int, rows: int, cols: int, qtype: T) -> np.ndarray:
    fmt = get_format(qtype)
    blocks = random_blocks(qtype, n_experts * rows * cols // fmt.block_size, rng, scale=0.05)
    return blocks.reshape(n_experts, rows, -1)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _numba_sum(a: np.ndarray) -> float:
    s = np.float32(0.0)
    for i in numba.prange(a.size):
        s += a[i]
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_moe")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 4, half, all)")
    ap.add_argument("--gib", type=float, default=2.0, help="weights cycled through (more than the caches hold)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--host-node", action="store_true", help="run the layers as CUDA host functions")
    ap.add_argument("--memory", default="numpy", help="comma-separated: numpy, pinned, huge, file (see above)")
    ap.add_argument("--chunks", default="0", help="--host-node: comma-separated parallel chunk sizes")
    ap.add_argument("--rows-per-task", type=int, default=None,
                    help="rows of one parallel task in the kernels (set NUMBA_CACHE_DIR to a fresh folder: the "
                         "value is compiled in)")
    a = ap.parse_args()
    if a.rows_per_task:
        from hybridmoe.kernels.cpu import raw_int8
        raw_int8.ROWS_PER_TASK = a.rows_per_task
    dim, inter, n_experts, top_k = SHAPES[a.shape]
    qtype = T[a.type]
    rng = np.random.default_rng(0)
    per_layer = sum(stacked(rng, 1, r, c, qtype).nbytes for r, c in ((inter, dim), (inter, dim), (dim, inter)))
    n_layers = max(2, int(a.gib * 2**30 // (per_layer * n_experts)))
    made = [tuple(stacked(rng, n_experts, r, c, qtype) for r, c in ((inter, dim), (inter, dim), (dim, inter)))
            for _ in range(n_layers)]
    print("transparent huge pages:", _thp())
    for memory in a.memory.split(","):
        layers = [tuple(_placed(t, memory) for t in lay) for lay in made]
        print(f"-- weights in {memory} memory")
        rc = _run(a, layers, qtype, dim, inter, n_experts, top_k, per_layer, n_layers, rng)
        if rc:
            return rc
    return 0


def _thp() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def _placed(a: np.ndarray, memory: str) -> np.ndarray:
    """A copy of `a` in the asked kind of memory (kept alive by the array's base)."""
    if memory == "numpy":
        return a
    if memory == "pinned":
        t = torch.empty(a.shape, dtype=torch.uint8, pin_memory=True)
        out = t.numpy()
    elif memory == "huge":
        import ctypes
        import mmap
        m = mmap.mmap(-1, a.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        out = np.frombuffer(m, dtype=np.uint8).reshape(a.shape)
        ctypes.CDLL(None).madvise(ctypes.c_void_p(out.ctypes.data), ctypes.c_size_t(a.nbytes), 14)  # MADV_HUGEPAGE
    elif memory == "file":  # written, then mapped read-only: the page cache's pages, as a GGUF's
        import tempfile
        with tempfile.NamedTemporaryFile(dir="/tmp", delete=False) as f:
            a.tofile(f)
        out = np.memmap(f.name, dtype=np.uint8, mode="r", shape=a.shape)
        Path(f.name).unlink()  # the mapping keeps the pages
        return out
    else:
        raise SystemExit(f"--memory: unknown kind {memory!r} (numpy, pinned, huge, file)")
    out[...] = a
    return out


def _run(a, layers, qtype, dim, inter, n_experts, top_k, per_layer, n_layers, rng) -> int:
    x = rng.standard_normal((1, dim)).astype(np.float32)
    w = rng.random((1, top_k)).astype(np.float32)
    read = torch.ones(2**29)  # 2 GiB
    flat = read.numpy()
    n_all = numba.config.NUMBA_NUM_THREADS
    counts = [int(t) for t in a.threads.split(",")] if a.threads else sorted({4, n_all // 2, n_all})
    print(f"{a.shape}: rows per task {a.rows_per_task or 'default'}, D {dim}, I {inter}, {top_k} of {n_experts} experts, {qtype.name}; {n_layers} layers of "
          f"{per_layer * n_experts / 2**20:.0f} MiB cycled; one layer's K experts: {top_k * per_layer / 1e6:.1f} MB")
    print(f"{'threads':>8}{'read torch':>12}{'read numba':>12}{'layer us':>10}{'GB/s':>8}{'of read':>9}"
          f"{'cached us':>11}{'1 expert us':>13}{'1 cached us':>13}")
    types = (qtype,) * 3
    if a.host_node:
        return host_nodes(layers, x, w, types, counts, [int(c) for c in a.chunks.split(",")], rng, n_experts, top_k,
                          top_k * per_layer)
    for n in counts:
        torch.set_num_threads(n)
        cpu.set_threads(n)
        time.sleep(0.3)
        rt = min(_t(lambda: read.sum()) for _ in range(5))
        rn = min(_t(lambda: _numba_sum(flat)) for _ in range(5))
        bw_torch, bw_numba = read.numel() * 4 / rt / 1e9, flat.nbytes / rn / 1e9
        picks = [(layers[i % n_layers], sorted(rng.choice(n_experts, top_k, replace=False).tolist()))
                 for i in range(a.calls)]
        cpu.ffn_raw_int8(x, *layers[0], types, picks[0][1], w)
        times = []
        for lay, ids in picks:
            t0 = time.perf_counter()
            cpu.ffn_raw_int8(x, *lay, types, ids, w)
            times.append(time.perf_counter() - t0)
        us = 1e6 * statistics.median(times)
        gbs = top_k * per_layer / (us * 1e-6) / 1e9
        same = picks[0]  # the same experts every call: from the caches, if they hold one layer's K experts
        cached = 1e6 * statistics.median(_t(lambda: cpu.ffn_raw_int8(x, *same[0], types, same[1], w))
                                         for _ in range(50))
        one = 1e6 * statistics.median(_t(lambda: cpu.ffn_raw_int8(x, *layers[i % n_layers], types, [i % n_experts],
                                                                 w[:, :1])) for i in range(100))
        tiny = [arr[:2, :, :] for arr in layers[0]]
        tiny = tuple(np.ascontiguousarray(t) for t in tiny)
        empty = 1e6 * statistics.median(_t(lambda: cpu.ffn_raw_int8(x, *tiny, types, [0], w[:, :1]))
                                        for _ in range(200))
        print(f"{n:>8}{bw_torch:>12.1f}{bw_numba:>12.1f}{us:>10.0f}{gbs:>8.1f}{gbs / max(bw_torch, bw_numba):>9.2f}"
              f"{cached:>11.0f}{one:>13.0f}{empty:>13.0f}", flush=True)
    return 0


def host_nodes(layers, x, w, types, counts, chunks, rng, n_experts: int, top_k: int, nbytes: int) -> int:
    from hybridmoe.kernels.cpu import host_task, raw_int8
    from hybridmoe.offload import host_node
    stream = torch.cuda.Stream()
    driver = host_node._driver()
    ids = np.zeros((1, top_k), dtype=np.int64)
    out = np.empty((1, x.shape[1]), dtype=np.float32)
    kinds = tuple(raw_int8.KIND[t] for t in types)
    print(f"{'threads':>8}{'chunk':>7}{'layer us':>10}{'GB/s':>8}{'in node us':>12}")
    rate = host_task.cycles_per_second()
    for n in counts:
        for chunk in chunks:
            blocks = [host_task.fill_block(host_task.new_block(), x=x, ids=ids, weights=w, out=out, gate=g, up=u,
                                           down=d, kinds=kinds, threads=n, chunk=chunk) for g, u, d in layers]
            times = []
            for rep in range(12):
                ids[0] = np.sort(rng.choice(n_experts, top_k, replace=False))  # the same experts in each layer
                t0 = time.perf_counter()
                for i in range(48):
                    host_node._check(driver.cuLaunchHostFunc(stream.cuda_stream, host_task.ADDRESS,
                                                             blocks[(rep * 48 + i) % len(blocks)].ctypes.data), "launch")
                stream.synchronize()
                times.append((time.perf_counter() - t0) / 48)
            us = 1e6 * statistics.median(times[2:])
            cycles = sum(int(b[host_task.CYCLES]) for b in blocks) / sum(int(b[host_task.RUNS]) for b in blocks)
            print(f"{n:>8}{chunk:>7}{us:>10.0f}{nbytes / us / 1e3:>8.1f}{cycles / rate * 1e6:>12.0f}", flush=True)
    return 0


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
