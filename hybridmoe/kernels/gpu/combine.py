"""The routed experts' weighted sum in one launch: parts [N, K, D] (any strides along N and K), weights [N, K]
float32 -> [N, D], summed in float32 and rounded once to the output dtype, as `layers.moe.combine` (four kernels in
eager torch: a cast, a product, a sum and a cast back)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks
from .formats import rounded


@triton.jit
def combine_kernel(parts, weights, out, K, D, spn, spk, swn, BK: tl.constexpr, BD: tl.constexpr):
    """Program (n, d tile): out[n, tile] = sum_k weights[n, k] * parts[n, k, tile]."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)[None, :]
    k = tl.arange(0, BK)[:, None]
    p = tl.load(parts + n * spn + k * spk + d, mask=(k < K) & (d < D), other=0.0).to(tl.float32)
    w = tl.load(weights + n * swn + k, mask=k < K, other=0.0)
    y = rounded(tl.sum(p * w, axis=0)[None, :], out.dtype.element_ty)  # rounded to nearest even, as torch's cast
    tl.store(out + n * D + d, y.to(out.dtype.element_ty), mask=d < D)


def combine(parts: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    device = checks.device_of("parts", parts)
    checks.device_of("weights", weights, device)
    if parts.dim() != 3 or weights.shape != parts.shape[:2] or weights.dtype != torch.float32:
        raise ValueError(f"parts must be [N, K, D] and weights float32 [N, K], got {tuple(parts.shape)} and "
                         f"{weights.dtype} {tuple(weights.shape)}")
    N, K, D = parts.shape
    if parts.stride(-1) != 1:
        parts = parts.contiguous()
    weights = weights.contiguous()
    out = torch.empty(N, D, dtype=dtype, device=device)
    if N * D:
        bd = min(1024, triton.next_power_of_2(D))
        combine_kernel[(N, triton.cdiv(D, bd))](parts, weights, out, K, D, parts.stride(0), parts.stride(1),
                                                 weights.stride(0), BK=triton.next_power_of_2(K), BD=bd,
                                                 num_warps=4)
    return out
