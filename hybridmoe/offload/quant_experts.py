"""QuantExperts: routed experts computed on the CPU straight from their GGUF bytes (the "mmap" tier).

One expert is a contiguous byte range of each stacked `ffn_{gate,up,down}_exps` tensor, so selecting expert e is
slicing `raw[e]`: nothing is dequantized ahead of time and the weights are read from the page cache. `activations`
picks the decode kernels: "f32" is exact (each type's fused dequant-GEMV over the file's layout); "int8" rounds x to
8 bits per group of 32, as llama.cpp does, and runs a decode step's experts of a layer in one call: on the file's
bytes for Q2_K to Q6_K, Q8_0 and IQ4_XS layers (several times faster than "f32" there), else on a
repacked copy. With many tokens per expert (prefill), or for types without a kernel, rows are dequantized in tiles
for a matmul. tier="packed" copies every expert at load into the kernels' lane-interleaved layout, stacked per layer,
which decodes faster than the file's layout with float32 activations; the copy is as large as the experts (the
file's pages can then be dropped).

Letters: N tokens, K experts per token, D hidden, I expert hidden.
"""
from __future__ import annotations

import time

import torch

from ..formats.gguf import GGUFTensor
from ..layers.moe import HostPlacedExperts, run_experts
from .quant_store import QuantStore, host_f32

TIERS = ("mmap", "packed")


class QuantExperts(HostPlacedExperts):
    """Experts protocol over raw GGUF expert tensors: layer -> (gate [E, I, D], up [E, I, D], down [E, D, I]).
    Each expert is computed by a QuantStore, the same code the offload engine's host tier runs."""

    def __init__(self, layers: dict[int, tuple[GGUFTensor, GGUFTensor, GGUFTensor]], tier: str = "mmap",
                 activations: str = "f32"):
        if tier not in TIERS:
            raise ValueError(f"experts tier {tier!r} is not one of {', '.join(TIERS)}")
        for layer, projs in layers.items():
            (E, I, D), down = projs[0].shape, projs[2].shape
            if projs[1].shape != (E, I, D) or down != (E, D, I):
                raise ValueError(f"layer {layer}: expert shapes {[p.shape for p in projs]} do not fit together")
        self.layers, self.tier = layers, tier
        self.store = QuantStore(layers, "mmap", repack=tier == "packed", activations=activations)
        if tier == "packed":  # the pinned tier is copied once, at load, so no step pays for it later
            self.store.prepack()
        self.activity: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens routed, since the last take
        self.cpu_s = 0.0
        self.disk = None  # offload.disk.DiskTier, where the experts exceed the memory budget

    @property
    def packed(self) -> dict:
        return self.store.packed

    def take_stats(self) -> dict:
        """Counters since the last call, for the per-step stats event."""
        out = {"expert_tokens": self.activity, "cpu_expert_s": self.cpu_s}
        self.activity, self.cpu_s = {}, 0.0
        if self.disk is not None:
            out |= self.disk.take_stats()
        return out

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> sum_k weights[:, k] * expert_{ids[:, k]}(x), as [N, D]."""
        t0 = time.perf_counter()
        xs = host_f32(x)  # experts run on the host: the hidden state goes there
        if self.disk is not None:  # experts beyond the memory budget: their reads start (or are awaited) here
            self.disk.before(layer, xs, ids)
        # A prefill's experts in one grouped call, except where the disk tier streams them one by one within its
        # window (the grouped call would read them all at once, from pages the tier has not read or checked)
        grouped = None if self.disk is not None else \
            (lambda experts, xe, counts: self.store.compute_host_grouped(layer, experts, xe, counts))
        y = run_experts(xs, ids, host_f32(weights),
                        lambda e, xe: self._compute(layer, e, xe), self.activity.setdefault(layer, {}),
                        lambda experts, xe: self.store.compute_host_many(layer, experts, xe),
                        lambda experts, xe, w: self.store.compute_host_sum(layer, experts, xe, w), grouped)
        self.cpu_s += time.perf_counter() - t0
        return y if y.dtype == x.dtype and y.device == x.device else y.to(x.device, x.dtype)

    def decode_weights(self, layer: int) -> tuple | None:
        """(gate, up, down, types) of the layer's experts where one token's step can run them in one kernel call with
        the layer's router and shared expert (kernels.cpu.MoEBlock: the file's bytes, 8-bit activations), else None
        (the disk tier reads and checks its experts itself)."""
        got = self.store.host_task_weights(layer) if self.disk is None else None
        return None if got is None else (*got[0], got[1])

    def ran(self, layer: int, chosen: list[int], seconds: float) -> None:
        """A step's experts of `layer` ran elsewhere (a MoEBlock): count them as __call__ does."""
        counts = self.activity.setdefault(layer, {})
        for e in chosen:
            counts[e] = counts.get(e, 0) + 1
        self.cpu_s += seconds

    def _compute(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.disk is not None:
            self.disk.need(layer, e)  # a prefill streams the layer's experts from disk in this order
        return self.store.compute_host(layer, e, x)
