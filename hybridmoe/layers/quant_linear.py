"""A linear layer that keeps a GGUF weight quantized, for models whose non-expert layers run on the CPU.

llama.cpp reads Q8_0 attention weights at about a byte per weight; dequantized to f32 they would be read at four.
Decode (a few rows) goes through the CPU kernels' lane-interleaved layout, prefill through f32 tiles + matmul.
Activations are f32 (the exact path) unless `activations="int8"` (the engine's default), where x is rounded to 8
bits per group of 32 as llama.cpp does, and prefill too runs the lane-interleaved 8-bit kernels (each 16-row tile
read once for all rows: 2-3x faster than the f32 tiles + matmul); decode takes about a third less time on these
memory-bound layers. Logits move by up to tens of percent on random test models, as llama.cpp's own, and
perplexity by about 1 % or less (bench/RESULTS.md).
Several layers that read the same input (q, k and v) can be stacked into one, which decodes in one kernel call.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels import cpu as ck

DECODE_ROWS = 4  # up to this many tokens the GEMV kernel beats dequantize + matmul


class QuantLinear(nn.Module):
    def __init__(self, raw: np.ndarray | list[np.ndarray], qtype, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, activations: str = "f32"):
        """raw: uint8 [out_features, row_bytes] GGUF rows, or a list of such blocks of rows stacked in that order."""
        super().__init__()
        parts = raw if isinstance(raw, list) else [raw]
        self.parts = [np.ascontiguousarray(p) for p in parts]  # kept as they are (file views): prefill reads them
        self.qtype, self.activations = qtype, activations
        self.in_features, self.out_features = in_features, out_features
        if sum(p.shape[0] for p in self.parts) != out_features:
            raise ValueError(f"{[p.shape for p in self.parts]} rows do not make {out_features} outputs")
        stacked = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)  # freed after repacking
        self.packed = ck.repack(stacked, qtype, activations=activations)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def supports(qtype) -> bool:
        return qtype in ck.PACKED_TYPES

    @staticmethod
    def stack(layers: list["QuantLinear"]) -> "QuantLinear | None":
        """One layer computing `layers` (same input, same type) side by side, their outputs concatenated; None if
        they do not fit together."""
        first = layers[0]
        if any(q.qtype != first.qtype or q.in_features != first.in_features or q.activations != first.activations
               or (q.bias is None) != (first.bias is None) for q in layers):
            return None
        bias = None if first.bias is None else torch.cat([q.bias.detach() for q in layers])
        return QuantLinear([p for q in layers for p in q.parts], first.qtype, sum(q.out_features for q in layers),
                           first.in_features, bias, first.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        if xf.shape[0] <= DECODE_ROWS and xf.dtype == torch.float32 and self.bias is None and xf.is_contiguous():
            # decode: straight to the kernel (each torch op here would start with cold caches)
            return ck.gemv_packed(xf, self.packed).view(*shape[:-1], self.out_features)
        xf = xf.float().contiguous()
        if xf.shape[0] <= DECODE_ROWS or self.activations == "int8":  # int8: one pass over the tiles for all rows
            y = ck.gemv_packed(xf, self.packed)
        elif len(self.parts) == 1:
            y = ck.matmul(xf, self.parts[0], self.qtype)
        else:
            y = torch.cat([ck.matmul(xf, p, self.qtype) for p in self.parts], dim=-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        acts = "" if self.activations == "f32" else f", {self.activations} activations"
        return f"{self.in_features}, {self.out_features}, {self.qtype.name}{acts}"


class QuantSwiGLU:
    """down(silu(gate(x)) * up(x)) of three QuantLinear layers with 8-bit activations, for a few decode rows in one
    kernel call (kernels.cpu.ffn_experts of a one-expert stack): x rounded once, the hidden state once, as the three
    layers one after another round them."""

    def __init__(self, gate: QuantLinear, up: QuantLinear, down: QuantLinear):
        self.weights = [ck.PackedExperts(w.qtype, w.n_rows, w.n_cols, w.lanes, tuple(a[None] for a in w.arrays),
                                         w.activations) for w in (gate.packed, up.packed, down.packed)]
        self.out_features = down.out_features

    @staticmethod
    def of(gate, up, down) -> "QuantSwiGLU | None":
        """The fused form of these layers, or None where they are not all QuantLinear with 8-bit activations and no
        bias."""
        layers = (gate, up, down)
        if not all(isinstance(q, QuantLinear) and q.activations == "int8" and q.bias is None for q in layers):
            return None
        return QuantSwiGLU(gate, up, down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., D] -> [..., D], or None unless x is a few contiguous float32 rows."""
        xf = x.reshape(-1, x.shape[-1])
        if xf.shape[0] > DECODE_ROWS or xf.dtype != torch.float32 or not xf.is_contiguous():
            return None
        y = ck.ffn_experts(xf.numpy(), *self.weights, [0])[0]
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)
