"""Turn a loaded model into an offloaded one: experts in a host tier, GPU expert caches per pipeline stage,
router-predicted prefetch, and the cost model. `accelerator="cpu"` runs all of it with the CPU standing in for
the GPUs, which is how CI tests it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import OffloadExperts
from .prefetch import Prefetcher
from .scheduler import CostModel
from .store import DenseStore


@dataclass(slots=True)
class OffloadOptions:
    accelerator: str = "cuda"  # "cuda", or "cpu" to simulate the GPUs on the CPU
    devices: int = 1  # pipeline stages (GPUs, or simulated ones)
    expert_cache_slots: int | None = None  # per device; None: from the plan; 0: no cache
    prefetch: bool = True
    prefetch_margin: int = 2
    experts_tier: str = "mmap"  # "pinned" (copied once into pinned RAM) or "mmap" (page cache)
    decay: float = 0.95

    def __post_init__(self):
        if self.accelerator not in ("cpu", "cuda"):
            raise ValueError(f"--accelerator {self.accelerator!r}: use cpu or cuda")
        if not 1 <= self.devices <= 16:
            raise ValueError("--devices must be between 1 and 16")
        if self.expert_cache_slots is not None and self.expert_cache_slots < 0:
            raise ValueError("--expert-cache-slots must be >= 0")
        if self.experts_tier not in ("pinned", "mmap"):
            raise ValueError(f"--experts-tier {self.experts_tier!r}: use pinned or mmap")
        if self.prefetch_margin < 0:
            raise ValueError("prefetch margin must be >= 0")


def stage_devices(opts: OffloadOptions) -> list[torch.device]:
    if opts.accelerator == "cpu":
        return [torch.device("cpu")] * opts.devices
    return [torch.device("cuda", i) for i in range(opts.devices)]


def split_layers(layer_bytes: list[int], n_stages: int) -> list[int]:
    """Contiguous stages balanced by bytes: stage index of each layer."""
    total = sum(layer_bytes) or 1
    out, acc = [], 0
    for b in layer_bytes:
        out.append(min(n_stages - 1, int((acc + b / 2) * n_stages / total)))
        acc += b
    return out


class OffloadRuntime:
    """Owns the offload machinery attached to one model; the generate loop calls tick() once per step."""

    def __init__(self, model, weights: dict, opts: OffloadOptions, stages: list[int], slots: list[int],
                 cost: CostModel | None = None):
        self.model, self.opts = model, opts
        devices = stage_devices(opts)
        pin = opts.experts_tier == "pinned" and torch.cuda.is_available()
        self.store = DenseStore(weights, opts.experts_tier, pin=pin)
        self.experts = OffloadExperts(self.store, {i: stages[i] for i in weights}, devices, slots, cost, opts.decay)
        self.prefetcher = None
        if opts.prefetch and any(slots):
            self.prefetcher = Prefetcher(model, opts.prefetch_margin, on_predict=self.experts.prefetch)
            self.experts.on_routed = self.prefetcher.record
            model.observers.append(self.prefetcher.observe)
        model.experts = self

    # Experts protocol, delegated, plus per-step stats that include prefetch quality.
    def __call__(self, layer, x, ids, weights):
        return self.experts(layer, x, ids, weights)

    def start(self, layer, x, ids, weights):
        return self.experts.start(layer, x, ids, weights)

    def take_stats(self) -> dict:
        self.experts.tick()
        stats = self.experts.take_stats()
        if self.prefetcher is not None:
            q = self.prefetcher.summary()
            if q:
                stats["prefetch"] = q
                stats["prefetch_recall"] = sum(v["recall_k_margin"] for v in q.values()) / len(q)
        return stats
