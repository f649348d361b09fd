"""Turn a loaded model into an offloaded one: experts in a host tier, GPU expert caches per pipeline stage,
router-predicted prefetch, and the cost model. `accelerator="cpu"` runs all of it with the CPU standing in for
the GPUs, which is how CI tests it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..options import Accelerator, CpuActivations, RunOptions, Tier
from .chunking import PREFILL_CHUNK, activation_bytes_per_token, size_prefill
from .expert_store import ExpertStore
from .experts import OffloadExperts
from .popularity import read_popularity, write_popularity
from .prefetch import Prefetcher
from .scheduler import CostModel
from .store import DenseStore


def activation_modes(cpu_activations: CpuActivations | str) -> tuple[str, str]:
    """--cpu-activations -> the activations of (the routed experts' kernels, the other quantized linear layers' on
    the CPU). "int8-all" (the default) rounds the inputs of every quantized matrix on the CPU to 8 bits per group of
    32, as llama.cpp does: perplexity within 1 % of exact on the tests' models and the demo model (bench/RESULTS.md);
    "int8" only the experts' inputs; "f32" none (exact, what the parity tests pin)."""
    mode = CpuActivations(cpu_activations)  # RunOptions has checked it
    return ("f32" if mode == CpuActivations.F32 else "int8"), ("int8" if mode == CpuActivations.INT8_ALL else "f32")


def make_store(experts, opts: RunOptions) -> ExpertStore:
    """The host tier for a model's experts: float weights (HF) or raw GGUF blocks."""
    pin = opts.experts_tier == Tier.PINNED and torch.cuda.is_available()
    if hasattr(experts, "weights"):  # LocalExperts
        return DenseStore(experts.weights, opts.experts_tier, pin=pin)
    from .quant_store import QuantStore
    # with 8-bit activations the store repacks the layers its raw-layout kernels do not take (QuantStore)
    return QuantStore(experts.layers, opts.experts_tier, pin=pin, repack=opts.cpu_repack,
                      activations=activation_modes(opts.cpu_activations)[0])


def stage_devices(opts: RunOptions) -> list[torch.device]:
    if opts.accelerator == Accelerator.CPU:
        return [torch.device("cpu")] * opts.devices
    return [torch.device("cuda", i) for i in range(opts.devices)]


class OffloadRuntime:
    """Owns the offload machinery attached to one model; the generate loop takes its stats once per step."""

    DECAY = 0.95  # of the expert cache's use counts per step

    def __init__(self, model, store, opts: RunOptions, stages: list[int],
                 kv_bytes: list[int] | None = None, cost: CostModel | None = None, vram_reserve: int = 3 << 29,
                 context: int = 4096):
        """store: a DenseStore or QuantStore holding every MoE layer's experts. stages: the stage of every layer.
        kv_bytes: per stage, the KV cache the context will need (kept free when sizing the cache from free VRAM).
        On a GPU the free VRAM also sizes the prefill chunk and the streamed prefill's staging (offload.chunking)."""
        self.model, self.opts = model, opts
        self.notices: list[str] = []
        devices = stage_devices(opts)
        self.store = store
        counts = store.n_experts
        kv_bytes = kv_bytes or [0] * len(devices)
        per_stage = [sum(n for layer, n in counts.items() if stages[layer] == s) for s in range(len(devices))]
        top_k = model.layers[model.moe_layers()[0]].ffn.spec.top_k
        per_token = activation_bytes_per_token(store.dim, store.inter, top_k)
        layer_experts = max(counts.values())
        free = [torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0 for dev in devices]

        def sizes(s: int, stream: bool) -> tuple[int, int, int]:
            """(slots, staging rows, chunk) of stage s; stream: keep staging, another GPU streams."""
            n = per_stage[s] if opts.expert_cache_slots is None else min(opts.expert_cache_slots, per_stage[s])
            if devices[s].type != "cuda":
                return n, (layer_experts if stream or n < per_stage[s] else 0), PREFILL_CHUNK
            got = size_prefill(free[s] - vram_reserve - kv_bytes[s], stage_experts=per_stage[s],
                               layer_experts=layer_experts, slot_bytes=store.slot_nbytes(), per_token=per_token,
                               context=context, max_slots=n, stream=stream)
            return got.slots, got.staging_rows, got.chunk

        plan = [sizes(s, False) for s in range(len(devices))]
        if len(devices) > 1 and any(rows for _, rows, _ in plan):  # every GPU takes a share of the streaming
            plan = [sizes(s, True) for s in range(len(devices))]
        slots, staging, chunks = (list(v) for v in zip(*plan))
        self.prefill_chunk = min(chunks)  # tokens per prefill forward pass (the generate loop's chunk)
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
        ring = prefetching and (opts.accelerator == "cpu" or opts.experts_tier == "pinned")
        n_ahead = top_k + opts.prefetch_margin if ring else 0
        self.experts = OffloadExperts(self.store, {i: stages[i] for i in counts}, devices, slots, cost, self.DECAY,
                                      n_ahead, top_k)
        for s, st in enumerate(self.experts.stages):
            if st.shrunk_from is not None:
                self.notices.append(f"GPU {s}: out of memory for {st.shrunk_from} expert slots; "
                                    f"using {st.cache.n_slots}")
        slots = [st.cache.n_slots for st in self.experts.stages]
        self.slots = slots
        self.experts.add_streams(staging)
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
