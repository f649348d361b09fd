"""Turn a loaded model into an offloaded one: experts in a host tier, GPU expert caches per pipeline stage,
router-predicted prefetch, and the cost model. `accelerator="cpu"` runs all of it with the CPU standing in for
the GPUs, which is how CI tests it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .experts import OffloadExperts
from .prefetch import Prefetcher
from .scheduler import CostModel
from .store import DenseStore


CPU_ACTIVATIONS = ("f32", "int8", "int8-all")


def activation_modes(cpu_activations: str) -> tuple[str, str]:
    """--cpu-activations -> the activations of (the routed experts' kernels, the other quantized linear layers' on
    the CPU). "int8-all" (the default) rounds the inputs of every quantized matrix on the CPU to 8 bits per group of
    32, as llama.cpp does: perplexity within 1 % of exact on the tests' models and the demo model (bench/RESULTS.md);
    "int8" only the experts' inputs; "f32" none (exact, what the parity tests pin)."""
    if cpu_activations not in CPU_ACTIVATIONS:
        raise ConfigError(f"--cpu-activations {cpu_activations!r}: use one of {', '.join(CPU_ACTIVATIONS)}")
    return ("f32" if cpu_activations == "f32" else "int8"), ("int8" if cpu_activations == "int8-all" else "f32")


def make_store(experts, opts: "OffloadOptions"):
    """The host tier for a model's experts: float weights (HF) or raw GGUF blocks."""
    pin = opts.experts_tier == "pinned" and torch.cuda.is_available()
    if hasattr(experts, "weights"):  # LocalExperts
        return DenseStore(experts.weights, opts.experts_tier, pin=pin)
    from .quant_store import QuantStore
    # with 8-bit activations the store repacks the layers its raw-layout kernels do not take (QuantStore)
    return QuantStore(experts.layers, opts.experts_tier, pin=pin, repack=opts.cpu_repack,
                      activations=activation_modes(opts.cpu_activations)[0])


@dataclass(slots=True)
class OffloadOptions:
    accelerator: str = "cuda"  # "cuda", or "cpu" to simulate the GPUs on the CPU
    devices: int = 1  # pipeline stages (GPUs, or simulated ones)
    expert_cache_slots: int | None = None  # per device; None: from the plan; 0: no cache
    prefetch: bool = True
    prefetch_margin: int = 2
    experts_tier: str = "mmap"  # "pinned" (copied once into pinned RAM) or "mmap" (page cache)
    decay: float = 0.95
    cpu_repack: bool = False  # GGUF experts: lane-interleaved copies for faster CPU decode (not bit-identical)
    cpu_activations: str = "int8-all"  # GGUF on the CPU: 8-bit activations for every quantized matrix (fast, as
    # llama.cpp); "int8" for the experts' only; "f32" exact

    def __post_init__(self):
        if self.accelerator not in ("cpu", "cuda"):
            raise ValueError(f"--accelerator {self.accelerator!r}: use cpu or cuda")
        if not 1 <= self.devices <= 16:
            raise ValueError("--devices must be between 1 and 16")
        if self.expert_cache_slots is not None and self.expert_cache_slots < 0:
            raise ValueError("--expert-cache-slots must be >= 0")
        if self.experts_tier not in ("pinned", "mmap"):
            raise ValueError(f"--experts-tier {self.experts_tier!r}: use pinned or mmap")
        activation_modes(self.cpu_activations)  # raises on an unknown mode
        if self.prefetch_margin < 0:
            raise ValueError("prefetch margin must be >= 0")


def stage_devices(opts: OffloadOptions) -> list[torch.device]:
    if opts.accelerator == "cpu":
        return [torch.device("cpu")] * opts.devices
    return [torch.device("cuda", i) for i in range(opts.devices)]


def cuda_slots_that_fit(store, device: torch.device, reserve: int, kv_bytes: int) -> int:
    """Slots that fit in what is free on `device` now that its weights are loaded."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, (free - reserve - kv_bytes) // max(1, store.slot_nbytes()))


class OffloadRuntime:
    """Owns the offload machinery attached to one model; the generate loop takes its stats once per step."""

    def __init__(self, model, store, opts: OffloadOptions, stages: list[int],
                 kv_bytes: list[int] | None = None, cost: CostModel | None = None, vram_reserve: int = 3 << 29):
        """store: a DenseStore or QuantStore holding every MoE layer's experts. stages: the stage of every layer.
        kv_bytes: per stage, the KV cache the context will need (kept free when sizing the cache from free VRAM)."""
        self.model, self.opts = model, opts
        self.notices: list[str] = []
        devices = stage_devices(opts)
        self.store = store
        counts = store.n_experts
        kv_bytes = kv_bytes or [0] * len(devices)
        per_stage = [sum(n for layer, n in counts.items() if stages[layer] == s) for s in range(len(devices))]
        slots = []
        for s, dev in enumerate(devices):
            n = per_stage[s] if opts.expert_cache_slots is None else min(opts.expert_cache_slots, per_stage[s])
            if dev.type == "cuda":
                n = min(n, cuda_slots_that_fit(self.store, dev, vram_reserve, kv_bytes[s]))
            slots.append(n)
        # Prefetch pays only where a cache holds some but not all of its stage's experts; its ring then holds one
        # step's predictions (top k + margin). Not from the mmap tier to a real GPU: copies from pageable memory
        # block the host, which would stall the step they are meant to overlap.
        prefetching = opts.prefetch and any(0 < n < per_stage[s] for s, n in enumerate(slots))
        top_k = model.layers[model.moe_layers()[0]].ffn.spec.top_k
        ring = prefetching and (opts.accelerator == "cpu" or opts.experts_tier == "pinned")
        n_ahead = top_k + opts.prefetch_margin if ring else 0
        self.experts = OffloadExperts(self.store, {i: stages[i] for i in counts}, devices, slots, cost, opts.decay,
                                      n_ahead, top_k)
        for s, st in enumerate(self.experts.stages):
            if st.shrunk_from is not None:
                self.notices.append(f"GPU {s}: out of memory for {st.shrunk_from} expert slots; "
                                    f"using {st.cache.n_slots}")
        slots = [st.cache.n_slots for st in self.experts.stages]
        self.slots = slots
        # When a stage's cache holds all of its experts, fill it now: generation then never copies.
        full = {s for s in range(len(devices)) if slots[s] and slots[s] == per_stage[s]}
        self.experts.warm([(layer, e) for layer, n in counts.items() if stages[layer] in full for e in range(n)])
        self.popularity: dict[tuple[int, int], int] = {}
        self.prefetcher = None
        if prefetching:
            self.prefetcher = Prefetcher(model, opts.prefetch_margin, on_predict=self.experts.prefetch)
            self.experts.on_routed = self.prefetcher.record
            self.experts.on_start = self.prefetcher.collect
            model.observers.append(self.prefetcher.observe)
        model.experts = self

    # Experts protocol, delegated, plus per-step stats that include prefetch quality.
    def __call__(self, layer, x, ids, weights):
        return self.experts(layer, x, ids, weights)

    def start(self, layer, x, ids, weights):
        return self.experts.start(layer, x, ids, weights)

    def resident(self, layer, x, ids, weights):
        return self.experts.resident(layer, x, ids, weights)

    def ran_resident(self, layer: int) -> None:
        self.experts.ran_resident(layer)

    def graph_resident(self, layer: int) -> bool:
        return self.experts.graph_resident(layer)

    @property
    def generation(self) -> int:
        return self.experts.generation

    def take_stats(self) -> dict:
        self.experts.tick()
        stats = self.experts.take_stats()
        for layer, counts in stats["expert_tokens"].items():
            for e, n in counts.items():
                self.popularity[(layer, e)] = self.popularity.get((layer, e), 0) + n
        if self.prefetcher is not None:
            q = self.prefetcher.summary()
            if q:
                stats["prefetch"] = q
                stats["prefetch_recall"] = sum(v["recall_k_margin"] for v in q.values()) / len(q)
        if self.notices:
            stats["notices"], self.notices = self.notices, []
        return stats

    def release_memory(self) -> str | None:
        """After an out-of-memory error: halve the largest GPU expert cache. Returns what was done, or None."""
        sizes = [st.cache.n_slots for st in self.experts.stages]
        if not any(sizes):
            return None
        stage = max(range(len(sizes)), key=sizes.__getitem__)
        freed = self.experts.shrink(stage)
        return f"out of GPU memory: expert cache on GPU {stage} shrunk by {freed} slots to {sizes[stage] - freed}"

    def save_popularity(self, path: str | Path) -> None:
        """Expert use counts seen so far, to warm the cache at the next start (load_popularity)."""
        rows = [[layer, e, n] for (layer, e), n in sorted(self.popularity.items())]
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps({"format": "hybridmoe-expert-popularity", "counts": rows}))
        os.replace(tmp, path)

    def load_popularity(self, path: str | Path) -> int:
        """Warm the caches with the most used experts of a saved popularity file. Returns experts copied."""
        try:
            data = json.loads(Path(path).read_text())
            rows = data["counts"] if data.get("format") == "hybridmoe-expert-popularity" else None
            counts = {(int(layer), int(e)): int(n) for layer, e, n in rows}
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}: not an expert popularity file written by save_popularity") from None
        known = {(layer, e) for layer, n in self.store.n_experts.items() for e in range(n)}
        ranked = [k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if k in known]
        for k in ranked:
            for st in self.experts.stages:
                st.cache.touch(k, counts[k])
        before = sum(len(st.cache) for st in self.experts.stages)
        self.experts.warm(ranked[:sum(st.cache.n_slots for st in self.experts.stages)])
        return sum(len(st.cache) for st in self.experts.stages) - before
