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
from .formats import rounded


@triton.jit
def rms_norm_kernel(x, res, total, w, out, D, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    """Program n: row n of x [rows, D] -> row n of out. HAS_RES: the row is x + res first (rounded to x's dtype,
    as torch's add), also stored to total."""
    row = tl.program_id(0).to(tl.int64) * D
    d = tl.arange(0, BLOCK)
    mask = d < D
    xf = tl.load(x + row + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        xf = rounded(xf + tl.load(res + row + d, mask=mask, other=0.0).to(tl.float32), x.dtype.element_ty)
        tl.store(total + row + d, xf.to(total.dtype.element_ty), mask=mask)
    r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = rounded(xf * r, x.dtype.element_ty)
    wf = tl.load(w + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row + d, rounded(wf * y, out.dtype.element_ty).to(out.dtype.element_ty), mask=mask)


def _checked(x: torch.Tensor, weight: torch.Tensor) -> torch.device:
    device = checks.device_of("x", x)
    checks.device_of("weight", weight, device)
    if x.dtype not in checks.FLOAT_DTYPES or weight.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x and weight must be float32, bfloat16 or float16, got {x.dtype} and {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) for rows of {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    return device


def _launch(x: torch.Tensor, res: torch.Tensor | None, total: torch.Tensor | None, weight: torch.Tensor,
            out: torch.Tensor, eps: float) -> None:
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    if rows:
        block = triton.next_power_of_2(D)
        rms_norm_kernel[(rows,)](x, x if res is None else res, out if total is None else total, weight.contiguous(),
                                 out, D, float(eps), BLOCK=block, HAS_RES=res is not None,
                                 num_warps=max(1, min(16, block // 512)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] on the same device -> [..., D] in the promoted dtype of x and weight."""
    device = _checked(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=device)
    _launch(x.contiguous(), None, None, weight, out, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm of it) in one launch; x and residual of one shape and dtype."""
    device = _checked(x, weight)
    checks.device_of("residual", residual, device)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must be {x.dtype} {tuple(x.shape)} like x, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    total = torch.empty(x.shape, dtype=x.dtype, device=device)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=device)
    _launch(x.contiguous(), residual.contiguous(), total, weight, out, eps)
    return total, out
