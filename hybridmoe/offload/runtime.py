"""Turn a loaded model into an offloaded one: experts in a host tier, GPU expert caches per pipeline stage,
router-predicted prefetch, and the cost model. `accelerator="cpu"` runs all of it with the CPU standing in for
the GPUs, which is how CI tests it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .experts import OffloadExperts
from .popularity import read_popularity, write_popularity
from .prefetch import Prefetcher
from .scheduler import CostModel
from .store import DenseStore


CPU_ACTIVATIONS = ("f32", "int8", "int8-all")


def activation_modes(cpu_activations: str) -> tuple[str, str]:
    """--cpu-activations -> the activations of (the repacked routed experts' kernels, the other quantized linear
    layers' on the CPU). "int8" rounds only the experts' inputs to 8 bits; "int8-all" also those of attention and
    the output head, which costs far more accuracy (bench/RESULTS.md)."""
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
    cpu_activations: str = "f32"  # GGUF on the CPU: "int8" rounds the repacked experts' x to 8 bits (faster),
    # "int8-all" also the other quantized linear layers' (faster still, less accurate)

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
        # Where every MoE layer's decode misses run on the CPU through host nodes inside the step's graph, hot experts
        # enter the cache between steps, and prefetching (which needs the host between layers) is off: at decode
        # the CPU computes a missing expert sooner than PCIe copies it (cost model), so a copy pays only by reuse.
        cost_model = cost or CostModel()
        host_nodes = (all(store.host_task_weights(layer) is not None for layer in counts)
                      and cost_model.place(1, store.expert_nbytes(), store.flops_per_token(), False) == "cpu")
        prefetching = (opts.prefetch and not host_nodes
                       and any(0 < n < per_stage[s] for s, n in enumerate(slots)))
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

    def device_only(self, layer: int) -> bool:
        return self.experts.device_only(layer)

    def start_device(self, layer, x, ids, weights):
        return self.experts.start_device(layer, x, ids, weights)

    def ran_device(self, layer: int) -> None:
        self.experts.ran_device(layer)

    @property
    def generation(self) -> int:
        return self.experts.generation

    def take_stats(self) -> dict:
        stats = self.experts.take_stats()  # (records the step's uses in the caches of graph-run layers: before tick)
        self.experts.tick()
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
        write_popularity(path, self.popularity)

    def load_popularity(self, path: str | Path) -> int:
        """Warm the caches with the most used experts of a saved popularity file. Returns experts copied."""
        counts = read_popularity(path)
        known = {(layer, e) for layer, n in self.store.n_experts.items() for e in range(n)}
        ranked = [k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if k in known]
        for k in ranked:
            for st in self.experts.stages:
                st.cache.touch(k, counts[k])
        before = sum(len(st.cache) for st in self.experts.stages)
        self.experts.warm(ranked[:sum(st.cache.n_slots for st in self.experts.stages)])
        return sum(len(st.cache) for st in self.experts.stages) - before
