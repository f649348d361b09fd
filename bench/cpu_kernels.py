"""Effective memory bandwidth of the CPU decode kernels against the machine's read bandwidth.

Each kernel runs a one-token GEMV over expert-sized matrices, cycling through many different experts so that the
caches cannot hold them; its bandwidth counts the bytes of the quantized weights as stored in the GGUF file.

    python bench/cpu_kernels.py                 # all cores, 64 experts
    python bench/cpu_kernels.py --threads 8 --quick
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridmoe.kernels import cpu  # noqa: E402
from hybridmoe.kernels.cpu import ggml  # noqa: E402
from hybridmoe.quant import get_format, random_blocks  # noqa: E402

SHAPES = [(2048, 7168), (7168, 2048)]  # (out, in): an expert's gate/up and down projections
TYPES = [T.Q4_K, T.Q8_0]
READ_BYTES = 2 << 30
# each runtime's OpenMP workers keep spinning for a moment after a parallel region and would steal the cores
SETTLE_S = 0.2


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@numba.njit(parallel=True, fastmath=True, cache=True)
def _numba_sum(a: np.ndarray) -> float:
    s = np.float32(0.0)
    for i in numba.prange(a.size):
        s += a[i]
    return s


def read_bandwidth(reps: int) -> dict[str, float]:
    """GB/s of a full-core sum over a buffer far larger than the caches, by torch and by a numba loop."""
    a = torch.ones(READ_BYTES // 4)
    time.sleep(1.0)
    by_torch = READ_BYTES / best_seconds(lambda: a.sum(), reps) / 1e9
    time.sleep(1.0)
    by_numba = READ_BYTES / best_seconds(lambda: _numba_sum(a.numpy()), reps) / 1e9
    return {"torch": by_torch, "numba": by_numba}


def kernel_routes(qtype: T, experts: list[np.ndarray], x: np.ndarray,
                  with_ggml: bool) -> dict[str, tuple[Callable[[int], object], int]]:
    """name -> (run expert e, bytes it reads per expert beyond the GGUF bytes)"""
    routes: dict[str, tuple[Callable[[int], object], int]] = {
        "numba raw": (lambda e: cpu.gemv(x, experts[e], qtype), 0),
    }
    if qtype in cpu.RAW_INT8_TYPES:
        routes["numba raw (int8 acts)"] = (lambda e: cpu.gemv_int8(x, experts[e], qtype), 0)
    if qtype in cpu.PACKED_TYPES:
        packed = [cpu.repack(w, qtype) for w in experts]
        routes["numba packed"] = (lambda e: cpu.gemv_packed(x, packed[e]), packed[0].nbytes - experts[0].nbytes)
        int8 = [cpu.repack(w, qtype, activations="int8") for w in experts]
        routes["numba packed (int8 acts)"] = (lambda e: cpu.gemv_packed(x, int8[e]),
                                              int8[0].nbytes - experts[0].nbytes)
    if with_ggml and ggml.available() and qtype in ggml.GGML_TYPES:
        routes["ggml raw (q8 acts)"] = (lambda e: ggml.gemv(x, experts[e], qtype), 0)
    return routes


def measure_kernels(n_experts: int, reps: int, with_ggml: bool, rng: np.random.Generator,
                    sum_seconds: Callable[[], float],
                    types: list[T] = TYPES) -> list[tuple[str, str, str, float, float, float, float]]:
    """(kernel, type, shape, GB/s, extra bytes / GGUF bytes, microseconds per matrix, torch-sum GB/s) for every
    route. Each pass over the experts follows one pass of the torch sum, and a row's ratio is its best pass against
    the best sum of the same passes: on a shared machine the read rate drifts by up to 2x within a run."""
    rows = []
    for qtype in types:
        for n_out, n_in in SHAPES:
            fmt = get_format(qtype)
            base = random_blocks(qtype, n_out * n_in // fmt.block_size, rng).reshape(n_out, -1)
            # contents do not change the speed: copies are enough to defeat the caches
            experts = [base.copy() for _ in range(n_experts)]
            x = rng.standard_normal((1, n_in)).astype(np.float32)
            for name, (run, extra) in kernel_routes(qtype, experts, x, with_ggml).items():
                def one_pass():
                    for e in range(n_experts):
                        run(e)
                one_pass()  # compiles, pages in
                seconds, summed = float("inf"), float("inf")
                for _ in range(reps):
                    time.sleep(SETTLE_S)
                    summed = min(summed, sum_seconds())
                    time.sleep(SETTLE_S)
                    start = time.perf_counter()
                    one_pass()
                    seconds = min(seconds, (time.perf_counter() - start) / n_experts)
                rows.append((name, qtype.name, f"{n_out}x{n_in}", base.nbytes / seconds / 1e9, extra / base.nbytes,
                             seconds * 1e6, READ_BYTES / summed / 1e9))
            del experts
    return rows


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llvmlite.binding as llvm

    wide = "-prefer-256-bit" in (numba.config.CPU_FEATURES or "")
    return (f"{model}, {os.cpu_count()} logical CPUs; numba {numba.__version__} for {llvm.get_host_cpu_name()}"
            f"{', 512-bit vectors' if wide else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                        help="threads for every kernel (default: all cores, %(default)s)")
    parser.add_argument("--experts", type=int, default=64, help="distinct matrices cycled through (default 64)")
    parser.add_argument("--reps", type=int, default=10,
                        help="passes over all experts; the fastest is kept (default 10; more on a shared machine)")
    parser.add_argument("--no-ggml", action="store_true", help="skip the optional llama.cpp route")
    parser.add_argument("--quick", action="store_true", help="16 experts, 2 passes: a smoke run, not a measurement")
    parser.add_argument("--types", default=",".join(t.name for t in TYPES),
                        help="comma-separated GGML types to measure (default %(default)s; e.g. Q2_K,Q3_K,IQ4_XS)")
    args = parser.parse_args()
    try:
        types = [T[name.strip().upper()] for name in args.types.split(",")]
    except KeyError as e:
        parser.error(f"--types: unknown GGML type {e.args[0]}")
    unknown = [t.name for t in types if t not in cpu.GEMV_TYPES]
    if unknown:
        have = ", ".join(t.name for t in cpu.GEMV_TYPES)
        parser.error(f"--types: no CPU kernel for {', '.join(unknown)} (have: {have})")
    if args.quick:
        args.experts, args.reps = min(args.experts, 16), 2

    cpu.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth(args.reps)
    print(f"# {machine()}; {args.threads} threads; {args.experts} experts; best of {args.reps}")
    print(f"# read bandwidth at the start: torch sum {bandwidth['torch']:.1f} GB/s, "
          f"numba sum {bandwidth['numba']:.1f} GB/s", flush=True)
    ones = torch.ones(READ_BYTES // 4)

    def sum_seconds() -> float:
        start = time.perf_counter()
        ones.sum()
        return time.perf_counter() - start

    rows = measure_kernels(args.experts, args.reps, not args.no_ggml, rng, sum_seconds, types)
    print("| kernel | type | out x in | GB/s | torch sum GB/s, same passes | / torch sum | extra bytes | us / matrix |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, type_name, shape, gbs, extra, micros, summed in rows:
        print(f"| {name} | {type_name} | {shape} | {gbs:.1f} | {summed:.1f} | {gbs / summed:.2f} | {extra:+.0%} "
              f"| {micros:.0f} |")

if __name__ == "__main__":
    main()
