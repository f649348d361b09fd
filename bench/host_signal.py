"""How a CUDA graph hands a layer to the CPU and waits for it: the per-layer cost of two mechanisms, measured in a
graph of N layers that each do some GPU work, copy a hidden state to the host, run one decode layer's CPU experts
(`kernels.cpu.host_task`, Qwen3-30B-A3B dims, the file layout's 8-bit kernels) and copy the result back.

    host      a host node (cuLaunchHostFunc): the driver's callback thread runs the task when the stream reaches it,
              with numba's thread team
    pool      stream memory operations: the stream writes a doorbell word in pinned memory (cuStreamWriteValue32)
              and waits for a done word (cuStreamWaitValue32); `kernels.cpu.host_pool`'s threads spin on the first,
              each computes its share of the layer, the last one sets the second, so no thread has to wake up

Each variant's step is timed with and without the CPU task (then the task block computes no experts), so the table
shows what the hand-over itself costs per layer.

    python bench/host_signal.py [--layers 48] [--threads 15] [--gpu-us 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import watch  # noqa: E402
from hybridmoe.kernels.cpu import host_pool, host_task, raw_int8  # noqa: E402
from hybridmoe.quant import random_blocks  # noqa: E402

D, I, E, K = 2048, 768, 128, 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--gpu-us", type=float, default=50.0, help="GPU work per layer between the hand-overs")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    watch.arm()
    from hybridmoe.offload.host_node import _check as check, _driver
    lib = _driver()
    rng = np.random.default_rng(0)
    stacks = [tuple(random_blocks(T.Q4_K, E * r * c // 256, rng, scale=0.05).reshape(E, r, -1)
                    for r, c in ((I, D), (I, D), (D, I))) for _ in range(4)]
    x = torch.zeros(1, D, pin_memory=True)
    ids = torch.tensor([list(range(0, K * 8, 8))], dtype=torch.int64, pin_memory=True)
    w = torch.full((1, K), 0.1, pin_memory=True)
    out = torch.zeros(1, D, pin_memory=True)
    scratch = np.zeros((K, I), dtype=np.float32), np.zeros((K, D), dtype=np.float32)
    blocks = [host_task.fill_block(host_task.new_block(), x=x.numpy(), ids=ids.numpy(), weights=w.numpy(),
                                   out=out.numpy(), gate=g, up=u, down=d, kinds=(raw_int8.KIND[T.Q4_K],) * 3,
                                   threads=a.threads, h=scratch[0], y=scratch[1]) for g, u, d in stacks]
    per_layer = [blocks[i % len(blocks)] for i in range(a.layers)]
    pool = None

    h = torch.randn(1, D, device="cuda")
    m = torch.randn(D, D, device="cuda") / D ** 0.5
    reps = max(1, round(a.gpu_us / 8))  # a 2048x2048 GEMV is a few us: a handful stand for a layer's attention
    y_dev = torch.zeros(1, D, device="cuda")

    def layer(i: int, mode: str, stream) -> None:
        nonlocal h
        for _ in range(reps):
            h = torch.tanh(h @ m)
        check(lib.cuMemcpyAsync(x.data_ptr(), h.data_ptr(), 4 * D, stream.cuda_stream), "copy")
        if mode == "host":
            check(lib.cuLaunchHostFunc(stream.cuda_stream, host_task.ADDRESS, per_layer[i].ctypes.data), "host")
        else:
            check(lib.cuStreamWriteValue32(stream.cuda_stream, pool.door_address, 1 + i % len(blocks), 0), "write")
            check(lib.cuStreamWaitValue32(stream.cuda_stream, pool.done_address, 1, 1), "wait")  # EQ
            check(lib.cuStreamWriteValue32(stream.cuda_stream, pool.done_address, 0, 0), "write")
        check(lib.cuMemcpyAsync(y_dev.data_ptr(), out.data_ptr(), 4 * D, stream.cuda_stream), "copy")
        h = h + y_dev

    rows = []
    for mode in ("host", "pool"):
        if mode == "pool":  # (not before: its threads spin on cores of their own)
            pool = host_pool.HostPool(a.threads, pin=True, idle_spin_s=host_pool.IDLE_SPIN_S)
            for b in blocks:
                pool.add(b)
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            for i in range(a.layers):  # warm-up outside the graph
                layer(i, mode, stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(a.layers):
                layer(i, mode, stream)
        for work in (True, False):
            for b in per_layer:
                b[host_task.TOP_K] = K if work else 0  # no experts: the hand-over alone
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                graph.replay()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append((mode, work, 1e6 * statistics.median(times[3:]) / a.layers))
    pool.stop()
    gpu = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(a.layers * reps):
            h = torch.tanh(h @ m)
        torch.cuda.synchronize()
        gpu.append((time.perf_counter() - t0) / a.layers)
    print(f"{a.layers} layers, {a.threads} CPU threads, GPU work per layer {1e6 * min(gpu):.0f} us (eager), "
          f"{torch.cuda.get_device_name()}")
    print(f"{'mechanism':<10}{'with experts us/layer':>24}{'hand-over only us/layer':>26}")
    for mode in ("host", "pool"):
        got = {work: us for m_, work, us in rows if m_ == mode}
        print(f"{mode:<10}{got[True]:>24.0f}{got[False]:>26.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
