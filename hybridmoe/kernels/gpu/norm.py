"""RMSNorm in one launch, for half-precision activations on the GPU.

The eager form (normalise in float32, cast back, scale by the weight) is eight elementwise and reduction kernels;
a decode layer runs two to four norms, and inside a CUDA graph each kernel still costs a launch slot of a few
microseconds, about what the norm's own work takes. Same arithmetic as `layers.norm.RMSNorm`: the row in float32,
times rsqrt(mean of squares + eps), rounded to x's dtype, then times the weight in float32 and rounded to the
output dtype (x's and the weight's promoted, as torch's `weight * y` gives). Only the order of the sum of squares
differs from torch's, so results agree to the last bit almost always and within one unit of the last place always.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks


@triton.jit
def rounded(v, dtype: tl.constexpr):
    """float32 v rounded to dtype, to nearest even, as float32 (exact in dtype). bfloat16 by hand: Triton's
    interpreter truncates that cast, the GPU rounds it."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def rms_norm_kernel(x, w, out, D, eps, BLOCK: tl.constexpr):
    """Program n: row n of x [rows, D] -> row n of out."""
    row = tl.program_id(0).to(tl.int64) * D
    d = tl.arange(0, BLOCK)
    mask = d < D
    xf = tl.load(x + row + d, mask=mask, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = rounded(xf * r, x.dtype.element_ty)
    wf = tl.load(w + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row + d, rounded(wf * y, out.dtype.element_ty).to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] on the same device -> [..., D] in the promoted dtype of x and weight."""
    device = checks.device_of("x", x)
    checks.device_of("weight", weight, device)
    if x.dtype not in checks.FLOAT_DTYPES or weight.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x and weight must be float32, bfloat16 or float16, got {x.dtype} and {weight.dtype}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},) for rows of {D}, got {tuple(weight.shape)}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=device)
    rows = xc.numel() // D if D else 0
    if rows:
        block = triton.next_power_of_2(D)
        rms_norm_kernel[(rows,)](xc, weight.contiguous(), out, D, float(eps), BLOCK=block,
                                 num_warps=max(1, min(16, block // 512)))
    return out
