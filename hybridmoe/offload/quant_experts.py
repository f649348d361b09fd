"""QuantExperts: routed experts computed on the CPU straight from their GGUF bytes (the "mmap" tier).

One expert is a contiguous byte range of each stacked `ffn_{gate,up,down}_exps` tensor, so selecting expert e is
slicing `raw[e]`: nothing is dequantized ahead of time and the weights are read from the page cache. Activations are
float32 (the exact path: no 8-bit quantization of x). Types the CPU kernels cover go through their fused
dequant-GEMV; with many tokens per expert (prefill), or for other types, rows are dequantized in tiles for a matmul.
tier="packed" copies every expert at load into the kernels' lane-interleaved layout, which decodes several times
faster than the file's layout; the copy is as large as the expert (the file's pages can then be dropped).

Letters: N tokens, K experts per token, D hidden, I expert hidden.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from ..formats.gguf import GGUFTensor
from ..kernels.cpu import GEMV_TYPES, PACKED_TYPES, PackedWeight, ffn_packed, gemv, gemv_packed, matmul, repack
from ..layers.moe import combine

# From this many tokens per expert on, dequantizing tiles for a matmul beats the GEMV kernels, which read each row
# once for all tokens (on 768x2048 Q4_K, 2 cores: a tile matmul costs 4x the GEMV at 64 tokens).
PREFILL_TOKENS = 256
TIERS = ("mmap", "packed")


class QuantExperts:
    """Experts protocol over raw GGUF expert tensors: layer -> (gate [E, I, D], up [E, I, D], down [E, D, I])."""

    def __init__(self, layers: dict[int, tuple[GGUFTensor, GGUFTensor, GGUFTensor]], tier: str = "mmap"):
        if tier not in TIERS:
            raise ValueError(f"experts tier {tier!r} is not one of {', '.join(TIERS)}")
        for layer, projs in layers.items():
            (E, I, D), down = projs[0].shape, projs[2].shape
            if projs[1].shape != (E, I, D) or down != (E, D, I):
                raise ValueError(f"layer {layer}: expert shapes {[p.shape for p in projs]} do not fit together")
        self.layers, self.tier = layers, tier
        self.packed: dict[tuple[int, int, int], PackedWeight] = {}  # (layer, projection, expert) -> copy
        self.activity: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens routed, since the last take
        self.cpu_s = 0.0
        if tier == "packed":  # the pinned tier is copied once, at load, so no step pays for it later
            for layer, projs in layers.items():
                for proj, w in enumerate(projs):
                    if w.qtype in PACKED_TYPES:
                        for e in range(w.shape[0]):
                            self.packed[(layer, proj, e)] = repack(w.raw[e], w.qtype)

    def take_stats(self) -> dict:
        """Counters since the last call, for the per-step stats event."""
        out = {"expert_tokens": self.activity, "cpu_expert_s": self.cpu_s}
        self.activity, self.cpu_s = {}, 0.0
        return out

    def bytes_per_expert(self, layer: int) -> int:
        return sum(t.raw[0].nbytes for t in self.layers[layer])

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K], weights [N, K] -> sum_k weights[:, k] * expert_{ids[:, k]}(x), as [N, D]."""
        t0 = time.perf_counter()
        N, K = ids.shape
        xs = x.detach().to("cpu", torch.float32).contiguous()  # experts run on the host: the hidden state goes there
        ids_host = ids.cpu()  # host sync: which experts run is decided on the host
        if N == 1 and self.tier == "packed" and all((layer, 2, e) in self.packed and (layer, 0, e) in self.packed
                                                      for e in ids_host[0].tolist()):
            y = self._decode_packed(layer, xs, ids_host[0].tolist(), weights, x.dtype)
            self.cpu_s += time.perf_counter() - t0
            return y.to(x.device)
        parts = torch.zeros(N, K, xs.shape[-1], dtype=torch.float32)  # [N, K, D]
        uniq, n_tok = torch.unique(ids_host, return_counts=True)
        counts = self.activity.setdefault(layer, {})
        for e, c in zip(uniq.tolist(), n_tok.tolist()):
            counts[e] = counts.get(e, 0) + c
            tok, k = (ids_host == e).nonzero(as_tuple=True)
            xe = xs[tok].contiguous()  # [n, D]
            h = F.silu(self._linear(xe, layer, 0, e)) * self._linear(xe, layer, 1, e)  # [n, I]
            parts[tok, k] = self._linear(h.contiguous(), layer, 2, e)
        y = combine(parts, weights.detach().cpu().float(), x.dtype)
        self.cpu_s += time.perf_counter() - t0
        return y.to(x.device)

    def _decode_packed(self, layer: int, xs: torch.Tensor, experts: list[int], weights: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """One token: each chosen expert's whole FFN in one call on its repacked weights."""
        xn = xs.numpy()
        parts = np.empty((1, len(experts), xn.shape[-1]), dtype=np.float32)  # [N=1, K, D]
        counts = self.activity.setdefault(layer, {})
        for k, e in enumerate(experts):
            counts[e] = counts.get(e, 0) + 1
            parts[0, k] = ffn_packed(xn, *(self.packed[(layer, p, e)] for p in range(3)))[0]
        return combine(torch.from_numpy(parts), weights.detach().cpu().float(), dtype)

    def _linear(self, x: torch.Tensor, layer: int, proj: int, e: int) -> torch.Tensor:
        """x [n, cols] @ expert e's [rows, cols].T, from its raw bytes (or its packed copy)."""
        w = self.layers[layer][proj]
        raw = w.raw[e]  # uint8 [rows, row_bytes]: a contiguous slice of the file
        if w.qtype == GGMLQuantizationType.F32:
            return x @ torch.from_numpy(raw.view(np.float32)).T
        if x.shape[0] >= PREFILL_TOKENS or w.qtype not in GEMV_TYPES:
            return matmul(x, raw, w.qtype)
        if self.tier == "packed" and w.qtype in PACKED_TYPES:
            key = (layer, proj, e)
            packed = self.packed.get(key)
            if packed is None:
                packed = self.packed[key] = repack(raw, w.qtype)
            return gemv_packed(x, packed)
        return gemv(x, raw, w.qtype)
