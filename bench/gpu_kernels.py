"""Effective bandwidth of the GPU decode kernels against the GPU's own memory bandwidth.

A decode GEMV must read every byte of its quantized weight once, so its speed is bytes of weights (as stored in the
GGUF file) per second, compared here with a device copy and a device sum of 1 GiB. Each kernel cycles through
enough different expert matrices that the L2 cache cannot hold them, and launches are replayed from a CUDA graph
so that the host's launch overhead stays out of the numbers ("single": one launch per matrix; "grouped": one launch
for --group matrices, as a layer's routed experts run).

    python bench/gpu_kernels.py                      # Q4_K and Q8_0, 2048x7168 and 7168x2048, one token
    python bench/gpu_kernels.py --types Q4_0 Q4_K Q5_K Q6_K Q8_0 --tokens 4
    python bench/gpu_kernels.py --sweep              # also time other tile configs (slower: many compiles)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridmoe.quant import dequantize as reference_dequantize  # noqa: E402
from hybridmoe.quant import get_format, random_blocks  # noqa: E402

SHAPES = ["2048x7168", "7168x2048"]  # (out, in): an expert's gate/up and its down projection in DeepSeek-V3
TYPES = ["Q4_K", "Q8_0"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--types", nargs="+", default=TYPES, help=f"GGML types (default: {' '.join(TYPES)})")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help=f"NxK weight shapes (default: {' '.join(SHAPES)})")
    p.add_argument("--tokens", type=int, default=1, help="activation rows n, 1..8 (default 1)")
    p.add_argument("--group", type=int, default=8, help="matrices per grouped launch (default 8)")
    p.add_argument("--l2-multiple", type=float, default=4.0,
                   help="weights cycled through, as a multiple of the L2 size (default 4)")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays; the median is reported (default 20)")
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile configs and print the best")
    args = p.parse_args()
    if not 1 <= args.tokens <= 8:
        p.error("--tokens must be 1..8")
    return args


def median_seconds(fn: Callable[[], object], reps: int, graph: bool = True) -> float:
    """Median time of fn() in seconds, measured with CUDA events; fn is replayed from a CUDA graph if `graph`."""
    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def memory_bandwidth(reps: int) -> tuple[float, float]:
    """(copy, read) bytes per second over 1 GiB: a copy counts bytes read plus written, a sum bytes read."""
    a = torch.rand(1 << 28, device="cuda")  # 1 GiB of float32
    b = torch.empty_like(a)
    nbytes = a.numel() * a.element_size()
    copy = 2 * nbytes / median_seconds(lambda: b.copy_(a), reps, graph=False)
    read = nbytes / median_seconds(lambda: a.sum(), reps, graph=False)
    return copy, read


def check(gpu, w: torch.Tensor, raw: np.ndarray, qtype: T, x: torch.Tensor) -> float:
    """Relative error of one GEMV against the numpy reference (the timings below are of a correct kernel)."""
    n_rows, n_cols = w.shape[0], x.shape[1]
    ref = x.double().cpu().numpy() @ reference_dequantize(raw, qtype, (n_rows, n_cols)).astype(np.float64).T
    y = gpu.gemv(x, w, qtype, out_dtype=torch.float32).double().cpu().numpy()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def sweep_configs(qtype: T, n_cols: int) -> list[dict]:
    """Tile configs around the default: rows, blocks per step (dividing the row), warps."""
    block = get_format(qtype).block_size
    nb = n_cols // block
    out = []
    for R in (4, 8, 16, 32):
        for BB in (1, 2, 4, 8, 16, 32):
            if nb % BB:
                continue
            for warps in (1, 2, 4):
                per_thread = R * BB * block // (32 * warps)
                if 32 <= per_thread <= 128:
                    out.append({"R": R, "BB": BB, "num_warps": warps})
    return out


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures GPU kernels")
    from hybridmoe.kernels import gpu  # imports triton
    from hybridmoe.kernels.gpu import decode

    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}")
    copy_bw, read_bw = memory_bandwidth(args.reps)
    print(f"memory: copy {copy_bw / 1e12:.2f} TB/s (read + write), sum {read_bw / 1e12:.2f} TB/s (read)\n")

    rng = np.random.default_rng(0)
    rows = []
    for name in args.types:
        qtype = T[name]
        fmt = get_format(qtype)
        for shape in args.shapes:
            n_rows, n_cols = (int(s) for s in shape.lower().split("x"))
            raw = random_blocks(qtype, n_rows * n_cols // fmt.block_size, rng).reshape(n_rows, -1)
            w = torch.from_numpy(raw).cuda()
            nbytes = raw.nbytes
            n_mats = max(2 * args.group, -(-int(args.l2_multiple * l2) // nbytes))
            n_mats = -(-n_mats // args.group) * args.group
            stack = w.expand(n_mats, -1, -1).contiguous()  # distinct copies, so the L2 cannot serve repeats
            x = torch.randn(args.tokens, n_cols, device="cuda", dtype=torch.bfloat16)
            err = check(gpu, w, raw, qtype, x)
            ids = torch.arange(n_mats, dtype=torch.int32, device="cuda").view(-1, args.group)

            def single(cfg: dict | None = None) -> None:
                for i in range(n_mats):
                    gpu.gemv(x, stack[i], qtype, config=cfg)

            def grouped() -> None:
                for chunk in ids:
                    gpu.gemv(x, stack, qtype, ids=chunk)

            def dequant() -> None:
                for i in range(n_mats):
                    gpu.dequantize(stack[i], qtype, (n_rows, n_cols))

            cfg = decode.pick_config(int(qtype), n_rows, n_cols // fmt.block_size, 1, torch.device("cuda"))
            print(f"{name} {n_rows}x{n_cols}: default tiles {cfg}; {n_mats} matrices of {nbytes / 1e6:.2f} MB")
            t_single = median_seconds(single, args.reps) / n_mats
            t_group = median_seconds(grouped, args.reps) / n_mats
            t_deq = median_seconds(dequant, max(3, args.reps // 4)) / n_mats
            label = f"{name} {n_rows}x{n_cols}"
            rows.append((label, "single", t_single, nbytes / t_single, err))
            rows.append((label, f"grouped x{args.group}", t_group, nbytes / t_group, err))
            deq_bytes = nbytes + n_rows * n_cols * 2  # read raw, write bf16
            rows.append((label, "dequant->bf16", t_deq, deq_bytes / t_deq, err))
            if args.sweep:
                timed = []
                for cfg in sweep_configs(qtype, n_cols):
                    t = median_seconds(lambda: single(cfg), max(5, args.reps // 2)) / n_mats
                    timed.append((t, cfg))
                timed.sort(key=lambda tc: tc[0])
                for t, cfg in timed[:5]:
                    print(f"  sweep {label}: {nbytes / t / 1e12:5.2f} TB/s  {t * 1e6:7.2f} us  {cfg}")
                print(f"  sweep {label}: worst {nbytes / timed[-1][0] / 1e12:.2f} TB/s {timed[-1][1]}")
            torch.cuda.empty_cache()

    print(f"\n{'weight':18} {'kernel':14} {'time':>9} {'GB/s':>7} {'/read':>6} {'/copy':>6}  rel.err (n={args.tokens})")
    for label, kind, t, bw, err in rows:
        print(f"{label:18} {kind:14} {t * 1e6:7.2f}us {bw / 1e9:7.0f} {bw / read_bw:6.2f} {bw / copy_bw:6.2f}  "
              f"{err:.1e}")
    print(f"(GB/s counts the quantized weight bytes; dequant counts raw bytes read + bf16 written; "
          f"{time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
