"""A linear layer that keeps a GGUF weight's blocks on the GPU instead of a dequantized bfloat16 copy.

A decode step reads each weight once, so a Q8_0 weight read as its blocks moves about half the bytes of its bf16 copy
(a Q4_K one about a quarter), and takes that much less VRAM, which goes to the expert cache. A few tokens go through
the Triton GEMV kernels (kernels.gpu.gemv: float32 sums over the exact dequantized values); more tokens (prefill)
dequantize the weight to the activations' dtype for one matrix product (the copy is freed after the call). Several
layers that read the same input (q, k and v) can be stacked into one, as QuantLinear's are on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gpu_kernel, gpu_kernel_for

MAX_TOKENS = 8  # kernels.gpu.MAX_TOKENS: the GEMV kernels keep every token's sums in registers


class GpuQuantLinear(nn.Module):
    def __init__(self, raw: torch.Tensor, qtype, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        """raw: uint8 [out_features, row_bytes] GGUF rows on the device that will run the layer."""
        super().__init__()
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[0] != out_features:
            raise ValueError(f"raw must be uint8 [{out_features}, row_bytes], got {raw.dtype} {list(raw.shape)}")
        self.register_buffer("raw", raw.contiguous())
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def supports(qtype) -> bool:
        from ..kernels.gpu import GPU_TYPES
        return qtype in GPU_TYPES

    @staticmethod
    def stack(layers: list["GpuQuantLinear"]) -> "GpuQuantLinear | None":
        """One layer computing `layers` (same input, same type) side by side, their outputs concatenated; None if
        they do not fit together."""
        first = layers[0]
        if any(q.qtype != first.qtype or q.in_features != first.in_features or q.raw.device != first.raw.device
               or (q.bias is None) != (first.bias is None) for q in layers):
            return None
        bias = None if first.bias is None else torch.cat([q.bias.detach() for q in layers])
        return GpuQuantLinear(torch.cat([q.raw for q in layers]), first.qtype, sum(q.out_features for q in layers),
                              first.in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        gemv = gpu_kernel_for(x2, "api", "gemv") if x2.shape[0] <= MAX_TOKENS else None
        y = gemv(x2.contiguous(), self.raw, self.qtype) if gemv is not None else None
        if y is None:  # many tokens (or no GEMV kernel here): one bf16 copy of the weight for one matrix product
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`, on the layer's device (the Triton kernel, else the numpy reference)."""
        shape = (self.out_features, self.in_features)
        kernel = gpu_kernel("api", "dequantize")
        w = kernel(self.raw, self.qtype, shape, dtype) if kernel is not None else None
        if w is None:
            from ..quant import dequantize
            w = torch.from_numpy(dequantize(self.raw.cpu().numpy(), self.qtype, shape)).to(self.raw.device, dtype)
        return w

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {getattr(self.qtype, 'name', self.qtype)} blocks"
