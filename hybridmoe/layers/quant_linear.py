"""A linear layer that keeps a GGUF weight quantized, for models whose non-expert layers run on the CPU.

llama.cpp reads Q8_0 attention weights at about a byte per weight; dequantized to f32 they would be read at four.
Decode (a few rows) goes through the CPU kernels' lane-interleaved layout, prefill through f32 tiles + matmul.
Activations stay f32 (the exact path).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels import cpu as ck

DECODE_ROWS = 4  # up to this many tokens the GEMV kernel beats dequantize + matmul


class QuantLinear(nn.Module):
    def __init__(self, raw: np.ndarray, qtype, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.raw, self.qtype = np.ascontiguousarray(raw), qtype
        self.in_features, self.out_features = in_features, out_features
        self.packed = ck.repack(self.raw, qtype)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def supports(qtype) -> bool:
        return qtype in ck.PACKED_TYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float().contiguous()
        if xf.shape[0] <= DECODE_ROWS:
            y = ck.gemv_packed(xf, self.packed)
        else:
            y = ck.matmul(xf, self.raw, self.qtype)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qtype.name}"
