"""Per expert and step: compute on the CPU, or copy to a GPU slot and compute there. Pure Python.

The constants come from the plan or a hardware profile (measured by `hybridmoe tune`): the CPU kernel's effective
read rate, host-to-device copy rate, and GPU rates. Decode (one token per expert) is bounded by reading the expert's
bytes once, which the CPU does at DRAM speed and a copy does at PCIe speed, so decode usually stays on the CPU;
prefill with many tokens per expert is bounded by arithmetic, where a copy then GPU compute wins.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CostModel:
    cpu_bytes_per_s: float = 20e9  # CPU kernel's read rate over expert weights, all threads
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

    def crossover_tokens(self, nbytes: int, flops_per_token: float) -> int:
        """Smallest token count at which copying beats the CPU (for plans and explanations)."""
        for n in range(1, 1 << 16):
            if self.place(n, nbytes, flops_per_token, cached=False) == "copy":
                return n
        return 1 << 16
