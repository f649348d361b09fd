"""Short measurements (60 s at most, all together) that give the cost model its constants: the CPU's expert
compute at the model's dimensions for one token (a read rate) and many tokens (a FLOP rate), the quantized CPU
kernel's read rate when hybridmoe.kernels.cpu is importable, pinned host-to-device copies per expert size, the
GPU's expert compute, and the disk's read rate. Each step shows a progress bar on stderr."""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..offload.scheduler import CostModel
from .probe import measure_disk_read

MiB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Share of the time budget per step; steps that cannot run (no GPU, no kernels) give their share back.
Q4K, Q4K_BLOCK, Q4K_ROW_BYTES = 12, 256, 144  # GGML type 12: 144 bytes per block of 256 weights
Q8, Q8_BLOCK, Q8_ROW_BYTES = 8, 32, 34  # GGML type 8 (Q8_0): 34 bytes per block of 32 weights
SHARES = {"cpu_decode": 0.30, "cpu_prefill": 0.10, "cpu_quant": 0.20, "h2d": 0.10, "gpu": 0.15, "disk": 0.15}


@dataclass(frozen=True, slots=True)
class ExpertDims:
    """One routed expert: gate and up [inter, dim], down [dim, inter]. Default: DeepSeek-V3's."""
    dim: int = 7168
    inter: int = 2048

    def __post_init__(self):
        if self.dim < 1 or self.inter < 1:
            raise ValueError("expert dims must be >= 1")

    @property
    def params(self) -> int:
        return 3 * self.dim * self.inter

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.params


@dataclass(slots=True)
class BenchSettings:
    dims: ExpertDims = field(default_factory=ExpertDims)
    dtype: str = "float32"  # of the dense expert weights, as the run will hold them (bf16 on GPU machines)
    budget_s: float = 60.0
    prefill_tokens: int = 128
    thread_counts: tuple[int, ...] = ()  # CPU threads to try; () = a few up to all cores
    disk_path: str | None = None  # None: skip the disk step
    rotation_bytes: int = 384 * MiB  # experts cycled through so that caches don't flatter the read rate
    progress: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"bench dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not 1 <= self.budget_s <= 600:
            raise ValueError("bench budget must be between 1 and 600 s")
        if self.prefill_tokens < 2:
            raise ValueError("prefill tokens must be >= 2")


@dataclass(slots=True)
class Measurements:
    """What was measured (None: not measured). Rates are bytes/s and FLOP/s."""
    cpu_bytes_per_s: float | None = None
    cpu_by_threads: dict[int, float] = field(default_factory=dict)
    cpu_flops: float | None = None
    cpu_quant_bytes_per_s: float | None = None
    cpu_quant_raw_bytes_per_s: float | None = None  # the file's layout, all threads: offload CPU experts run it
    cpu_quant_raw_by_threads: dict[int, float] = field(default_factory=dict)
    cpu_layer_bytes_per_s: float | None = None  # repacked Q8_0 [dim, dim]: quantized non-expert layers on the CPU
    h2d_bytes_per_s: float | None = None
    h2d_by_size: dict[int, float] = field(default_factory=dict)
    h2d_pageable_bytes_per_s: float | None = None
    gpu_bytes_per_s: float | None = None  # memory streaming rate (the cost model adds launch_s per expert)
    gpu_expert_bytes_per_s: float | None = None  # one-token expert FFN, launches included
    gpu_flops: float | None = None
    launch_s: float | None = None
    disk_read_bytes_per_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def cost_model(self, base: CostModel | None = None, quantized: bool = False) -> CostModel:
        """`base` with the measured fields replaced. quantized: the CPU rate is the quantized kernel's."""
        base = base or CostModel()
        cpu = self.cpu_quant_bytes_per_s if quantized and self.cpu_quant_bytes_per_s else self.cpu_bytes_per_s
        got = {"cpu_bytes_per_s": cpu, "cpu_flops": self.cpu_flops, "h2d_bytes_per_s": self.h2d_bytes_per_s,
               "gpu_bytes_per_s": self.gpu_bytes_per_s, "gpu_flops": self.gpu_flops, "launch_s": self.launch_s}
        return replace(base, **{k: v for k, v in got.items() if v and v > 0})


class Bar:
    """A one-line progress bar on stderr; without a terminal only the result line is printed."""

    def __init__(self, label: str, enabled: bool = True, width: int = 24):
        self.label, self.enabled, self.width = label, enabled, width
        self.live = enabled and sys.stderr.isatty()

    def update(self, fraction: float) -> None:
        if self.live:
            n = int(self.width * min(1.0, fraction))
            sys.stderr.write(f"\r  {self.label:<34}[{'#' * n}{'.' * (self.width - n)}]")
            sys.stderr.flush()

    def done(self, result: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.live else "") + f"  {self.label:<34} {result:<{self.width + 2}}\n")
            sys.stderr.flush()


def _repeat(fn: Callable[[], None], max_s: float, bar: Bar, min_reps: int = 3, max_reps: int = 200,
            sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of fn() after one warm-up call, repeated until max_s is spent (at least min_reps times)."""
    t_start = time.perf_counter()
    fn()
    sync()
    times = []
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - t_start
        bar.update(spent / max_s)
        if spent >= max_s and len(times) >= min_reps:
            break
    return statistics.median(times)


def _rotation(dims: ExpertDims, dtype: torch.dtype, rotation_bytes: int, device: str = "cpu",
              max_bytes: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Enough experts that one pass over them overflows the caches (at least two)."""
    one = dims.params * torch.finfo(dtype).bits // 8
    n = max(2, min(64, math.ceil(rotation_bytes / one)))
    if max_bytes is not None:
        n = max(1, min(n, max_bytes // one))
    # full_() writes every page; an untouched allocation would read the shared zero page and look too fast.
    return [(torch.full((dims.inter, dims.dim), 0.01, dtype=dtype, device=device),
             torch.full((dims.inter, dims.dim), 0.01, dtype=dtype, device=device),
             torch.full((dims.dim, dims.inter), 0.01, dtype=dtype, device=device)) for _ in range(n)]


def _ffn_pass(experts, x: torch.Tensor) -> Callable[[], None]:
    from ..layers.moe import expert_ffn

    def run():
        for gate, up, down in experts:
            expert_ffn(x, gate, up, down)
    return run


def _default_threads(cores: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, cores // 4), max(1, cores // 2), max(1, cores - 1), cores}))


def bench_cpu(s: BenchSettings, m: Measurements, decode_s: float, prefill_s: float, max_bytes: int) -> None:
    import psutil
    dtype = DTYPES[s.dtype]
    experts = _rotation(s.dims, dtype, s.rotation_bytes, max_bytes=max_bytes)
    nbytes = sum(t.numel() * t.element_size() for e in experts for t in e)
    cores = psutil.cpu_count(logical=False) or torch.get_num_threads()
    counts = s.thread_counts or _default_threads(cores)
    before = torch.get_num_threads()
    x1 = torch.full((1, s.dims.dim), 0.1, dtype=dtype)
    bar = Bar(f"CPU expert, 1 token ({s.dtype})", s.progress)
    try:
        for t in counts:
            torch.set_num_threads(t)
            m.cpu_by_threads[t] = nbytes / _repeat(_ffn_pass(experts, x1), decode_s / len(counts), bar)
        best = max(m.cpu_by_threads, key=m.cpu_by_threads.get)
        m.cpu_bytes_per_s = m.cpu_by_threads[best]
        bar.done(f"{m.cpu_bytes_per_s / 1e9:.1f} GB/s at {best} threads")
        torch.set_num_threads(best)
        bar = Bar(f"CPU expert, {s.prefill_tokens} tokens", s.progress)
        xn = torch.full((s.prefill_tokens, s.dims.dim), 0.1, dtype=dtype)
        sec = _repeat(_ffn_pass(experts[:2], xn), prefill_s, bar, min_reps=2)
        m.cpu_flops = 2 * s.prefill_tokens * s.dims.flops_per_token / sec
        bar.done(f"{m.cpu_flops / 1e12:.2f} TFLOP/s")
    finally:
        torch.set_num_threads(before)


def quant_kernels_usable(dims: ExpertDims, notes: list[str]) -> bool:
    if dims.dim % Q4K_BLOCK or dims.inter % Q4K_BLOCK:
        notes.append(f"quantized CPU kernels not measured: dims {dims.dim}x{dims.inter} are not multiples of "
                     f"{Q4K_BLOCK}")
        return False
    try:
        from ..kernels import cpu  # noqa: F401
    except Exception as e:  # numba missing, or the kernels do not build on this platform
        notes.append(f"quantized CPU kernels not measured ({type(e).__name__}: {e})")
        return False
    return True


def bench_cpu_quant(s: BenchSettings, m: Measurements, max_s: float) -> None:
    """The quantized GEMV kernels over Q4_K experts, as stored (raw: what the offload engine's host tier runs, at
    each thread count) and repacked (the faster one counts for the cost model), and the repacked Q8_0 kernel over
    [dim, dim] matrices (the non-expert layers a CPU run keeps quantized). The first call compiles the kernels
    (numba caches them on disk), which can overrun max_s once."""
    import numba
    import numpy as np

    from ..kernels import cpu as kernels
    row = Q4K_ROW_BYTES
    one = s.dims.params // Q4K_BLOCK * row
    n = max(2, min(32, math.ceil(s.rotation_bytes / one)))
    # 0x11 bytes: every scale a small normal half, so no NaN/denormal paths; written pages, unlike np.zeros.
    mats = [(np.full((s.dims.inter, s.dims.dim // Q4K_BLOCK * row), 0x11, np.uint8),
             np.full((s.dims.inter, s.dims.dim // Q4K_BLOCK * row), 0x11, np.uint8),
             np.full((s.dims.dim, s.dims.inter // Q4K_BLOCK * row), 0x11, np.uint8)) for _ in range(n)]
    xd = np.full((1, s.dims.dim), 0.1, np.float32)
    xi = np.full((1, s.dims.inter), 0.1, np.float32)
    cores = numba.config.NUMBA_NUM_THREADS
    counts = [t for t in (s.thread_counts or _default_threads(cores)) if t <= cores] or [cores]
    bar = Bar("CPU expert, 1 token (Q4_K kernel)", s.progress)
    raw_pass = lambda: [(kernels.gemv(xd, g, Q4K), kernels.gemv(xd, u, Q4K), kernels.gemv(xi, d, Q4K))  # noqa: E731
                        for g, u, d in mats]
    try:
        for t in counts:
            kernels.set_threads(t)
            m.cpu_quant_raw_by_threads[t] = n * one / _repeat(raw_pass, max_s / 2 / len(counts), bar)
        kernels.set_threads(cores)
        m.cpu_quant_raw_bytes_per_s = m.cpu_quant_raw_by_threads.get(cores) or max(m.cpu_quant_raw_by_threads.values())
        rates = {"raw": max(m.cpu_quant_raw_by_threads.values())}
        packed = [tuple(kernels.repack(w, Q4K) for w in e) for e in mats]
        mats.clear()  # the raw copies are not needed any more
        sec = _repeat(lambda: [(kernels.gemv_packed(xd, g), kernels.gemv_packed(xd, u), kernels.gemv_packed(xi, d))
                               for g, u, d in packed], max_s / 4, bar)
        rates["repacked"] = n * one / sec
        packed.clear()
        q8_row = s.dims.dim // Q8_BLOCK * Q8_ROW_BYTES
        n8 = max(2, min(32, math.ceil(s.rotation_bytes / (s.dims.dim * q8_row))))
        layers = [kernels.repack(np.full((s.dims.dim, q8_row), 0x11, np.uint8), Q8) for _ in range(n8)]
        sec = _repeat(lambda: [kernels.gemv_packed(xd, w) for w in layers], max_s / 4, bar)
        m.cpu_layer_bytes_per_s = n8 * s.dims.dim * q8_row / sec
    except Exception as e:  # a kernel change must not break tuning
        m.notes.append(f"quantized CPU kernel failed ({type(e).__name__}: {e})")
        bar.done("failed")
        return
    finally:
        kernels.set_threads(cores)
    best = max(rates, key=rates.get)
    m.cpu_quant_bytes_per_s = rates[best]
    bar.done(f"{rates[best] / 1e9:.1f} GB/s ({best}); raw {m.cpu_quant_raw_bytes_per_s / 1e9:.1f} at {cores} "
             f"threads; Q8_0 layers {m.cpu_layer_bytes_per_s / 1e9:.1f}")


def bench_h2d(s: BenchSettings, m: Measurements, max_s: float, device: torch.device) -> None:
    expert = s.dims.params * torch.finfo(DTYPES[s.dtype]).bits // 8
    sizes = sorted({1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, expert})
    bar = Bar("host-to-GPU copy (pinned)", s.progress)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731 - the timed region ends when the copy lands
    for size in sizes:
        src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        reps = max(3, min(50, (256 * MiB) // size))
        sec = _repeat(lambda: dst.copy_(src, non_blocking=True), max_s / (len(sizes) + 1), bar, max_reps=reps,
                      sync=sync)
        m.h2d_by_size[size] = size / sec
    src = torch.empty(64 * MiB, dtype=torch.uint8)
    dst = torch.empty(64 * MiB, dtype=torch.uint8, device=device)
    m.h2d_pageable_bytes_per_s = 64 * MiB / _repeat(lambda: dst.copy_(src), max_s / (len(sizes) + 1), bar,
                                                    max_reps=10, sync=sync)
    m.h2d_bytes_per_s = m.h2d_by_size[expert]
    bar.done(f"{m.h2d_bytes_per_s / 1e9:.1f} GB/s per expert, {m.h2d_pageable_bytes_per_s / 1e9:.1f} pageable")


def _gpu_copy_rate(size: int, device: torch.device, max_s: float, bar: Bar) -> float:
    """A large copy reads and writes every byte once: the memory rate, free of launch overhead."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / _repeat(lambda: dst.copy_(src), max_s, bar, sync=lambda: torch.cuda.synchronize(device))


def bench_gpu(s: BenchSettings, m: Measurements, max_s: float, device: torch.device) -> None:
    dtype = torch.bfloat16 if s.dtype == "float32" else DTYPES[s.dtype]  # GPUs hold bf16 weights
    free, _ = torch.cuda.mem_get_info(device)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    bar = Bar("GPU memory, expert, FLOP/s, launch", s.progress)
    m.gpu_bytes_per_s = _gpu_copy_rate(min(1 << 30, free // 8), device, max_s / 4, bar)
    experts = _rotation(s.dims, dtype, max(s.rotation_bytes, 1 << 30), device=str(device), max_bytes=free // 4)
    nbytes = sum(t.numel() * t.element_size() for e in experts for t in e)
    x1 = torch.full((1, s.dims.dim), 0.1, dtype=dtype, device=device)
    m.gpu_expert_bytes_per_s = nbytes / _repeat(_ffn_pass(experts, x1), max_s / 4, bar, sync=sync)
    xn = torch.full((max(512, s.prefill_tokens), s.dims.dim), 0.1, dtype=dtype, device=device)
    sec = _repeat(_ffn_pass(experts[:2], xn), max_s / 4, bar, sync=sync)
    m.gpu_flops = 2 * xn.shape[0] * s.dims.flops_per_token / sec
    tiny = _rotation(ExpertDims(64, 64), dtype, 0, device=str(device))[:1]
    xt = torch.full((1, 64), 0.1, dtype=dtype, device=device)
    m.launch_s = _repeat(_ffn_pass(tiny * 10, xt), max_s / 4, bar, sync=sync) / 10
    bar.done(f"{m.gpu_bytes_per_s / 1e9:.0f} GB/s, expert {m.gpu_expert_bytes_per_s / 1e9:.0f} GB/s, "
             f"{m.gpu_flops / 1e12:.0f} TFLOP/s, {m.launch_s * 1e6:.0f} us")


def run(settings: BenchSettings | None = None) -> Measurements:
    """All steps that this machine can run, sharing settings.budget_s between them. Each step's slice is worked
    out from the time left when it starts, so a slow step (a first kernel compile) shortens the later ones."""
    import psutil
    s = settings or BenchSettings()
    m = Measurements()
    cuda = torch.cuda.is_available()
    steps = ["cpu_decode", "cpu_prefill"] + (["cpu_quant"] if quant_kernels_usable(s.dims, m.notes) else [])
    steps += ["h2d", "gpu"] if cuda else []
    steps += ["disk"] if s.disk_path is not None else []
    if not cuda:
        m.notes.append("no CUDA GPU: host-to-GPU copy and GPU rates keep the profile's or default values")
    deadline = time.perf_counter() + s.budget_s

    def slice_s(*names: str) -> float:
        left = max(0.0, deadline - time.perf_counter())
        share = sum(SHARES[n] for n in names) / sum(SHARES[n] for n in steps[steps.index(names[0]):])
        return max(0.25, left * share)

    decode_s = slice_s("cpu_decode")
    bench_cpu(s, m, decode_s, decode_s * SHARES["cpu_prefill"] / SHARES["cpu_decode"],
              psutil.virtual_memory().available // 8)
    if "cpu_quant" in steps:
        bench_cpu_quant(s, m, slice_s("cpu_quant"))
    if cuda:
        dev = torch.device("cuda", 0)
        bench_h2d(s, m, slice_s("h2d"), dev)
        bench_gpu(s, m, slice_s("gpu"), dev)
        torch.cuda.empty_cache()
    if s.disk_path is not None:
        bar = Bar(f"disk read ({(Path(s.disk_path).name or s.disk_path)[:20]})", s.progress)
        m.disk_read_bytes_per_s = measure_disk_read(s.disk_path, max_s=slice_s("disk"))
        bar.done(f"{m.disk_read_bytes_per_s / 1e9:.2f} GB/s" if m.disk_read_bytes_per_s else "not measured")
    return m
