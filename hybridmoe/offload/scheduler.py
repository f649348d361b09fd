"""Where each routed expert runs: on the CPU, or copied into a GPU slot and computed there. Pure Python.

The constants come from the plan or a hardware profile (measured by `hybridmoe tune`): the CPU kernel's effective
read rate, host-to-device copy rate, and GPU rates. Decode (one token per expert) is bounded by reading the expert's
bytes once, which the CPU does at DRAM speed and a copy does at PCIe speed, so `place` usually keeps it on the CPU.
At prefill the CPU computes its experts while the GPU works through its queue (copies overlapping compute), so the
two are not alternatives for one resource: `split` gives the CPU the experts it computes cheapest relative to their
copy (the few-token ones) until the predicted layer time, the later of the two sides to finish, stops falling.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CostModel:
    # CPU kernel's read rate over expert weights, all threads. Without a profile this default decides where a
    # decode step's missing experts run: above h2d_bytes_per_s, on the CPU (one read from RAM rather than one
    # over PCIe, then a GPU read). Our kernels read 30-55 GB/s on the machines measured (bench/RESULTS.md).
    cpu_bytes_per_s: float = 40e9
    cpu_flops: float = 0.5e12  # CPU matmul rate for many tokens
    h2d_bytes_per_s: float = 25e9  # pinned host -> device copies
    gpu_bytes_per_s: float = 900e9
    gpu_flops: float = 100e12
    launch_s: float = 20e-6  # fixed cost per expert on the GPU (kernel launches)

    def __post_init__(self):
        for name in ("cpu_bytes_per_s", "cpu_flops", "h2d_bytes_per_s", "gpu_bytes_per_s", "gpu_flops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cost model: {name} must be > 0")

    def cpu_s(self, n_tokens: int, nbytes: int, flops_per_token: float) -> float:
        return max(nbytes / self.cpu_bytes_per_s, n_tokens * flops_per_token / self.cpu_flops)

    def gpu_s(self, n_tokens: int, nbytes: int, flops_per_token: float) -> float:
        return self.launch_s + max(nbytes / self.gpu_bytes_per_s, n_tokens * flops_per_token / self.gpu_flops)

    def copy_s(self, nbytes: int) -> float:
        return nbytes / self.h2d_bytes_per_s

    def place(self, n_tokens: int, nbytes: int, flops_per_token: float, cached: bool) -> str:
        """"gpu" (already in a slot), "copy" (copy into a slot, then GPU) or "cpu"."""
        if cached:
            return "gpu"
        copy = self.copy_s(nbytes) + self.gpu_s(n_tokens, nbytes, flops_per_token)
        return "copy" if copy < self.cpu_s(n_tokens, nbytes, flops_per_token) else "cpu"

    def split(self, n_tokens: list[int], nbytes: int, flops_per_token: float, busy_s: float = 0.0) -> list[bool]:
        """Prefill: for a step's uncached experts (tokens each), whether the CPU computes each one (True) or it is
        copied to the GPU, whose compute queue already holds busy_s of work (the cached experts). Minimises the
        predicted max(CPU total, copy total, GPU compute total), greedily; ties keep the given order."""
        cpu = [self.cpu_s(n, nbytes, flops_per_token) for n in n_tokens]
        gpu = [self.gpu_s(n, nbytes, flops_per_token) for n in n_tokens]
        copy = self.copy_s(nbytes)
        on_cpu = [False] * len(n_tokens)
        cpu_t, n_copies, gpu_t = 0.0, len(n_tokens), busy_s + sum(gpu)
        span = max(n_copies * copy, gpu_t)
        for i in sorted(range(len(n_tokens)), key=lambda i: cpu[i] / (copy + gpu[i])):  # stable: ties by index
            moved = max(cpu_t + cpu[i], (n_copies - 1) * copy, gpu_t - gpu[i])
            if moved >= span:
                break
            on_cpu[i], span = True, moved
            cpu_t, n_copies, gpu_t = cpu_t + cpu[i], n_copies - 1, gpu_t - gpu[i]
        return on_cpu

    def ring_quota(self, n_missing: int, nbytes: int, flops_per_token: float) -> int:
        """Decode: of the n_missing experts predicted for the next layer and not cached, how many to copy ahead
        into the prefetch ring. The copies (PCIe) and the CPU's compute of the rest run at the same time, so the
        best count makes the two finish about together: argmin over r of max(r * copy, (n - r) * cpu)."""
        copy, cpu = self.copy_s(nbytes), self.cpu_s(1, nbytes, flops_per_token)
        return min(range(n_missing + 1), key=lambda r: (max(r * copy, (n_missing - r) * cpu), r))

    def crossover_tokens(self, nbytes: int, flops_per_token: float) -> int:
        """Smallest token count at which copying beats the CPU (for plans and explanations)."""
        for n in range(1, 1 << 16):
            if self.place(n, nbytes, flops_per_token, cached=False) == "copy":
                return n
        return 1 << 16
