"""Rotary position embedding in one launch, for activations on the GPU.

`layers.rope.apply_rope` in eager torch is seven kernels (cos and sin cast to x's dtype, two products, two
multiply-adds, a concatenation), run for queries and keys in every layer. Same arithmetic here: cos and sin rounded
to x's dtype, x1 c and x2 c rounded, then x1 c - x2 s and x2 c + x1 s each rounded once; the output is contiguous,
its halves de-interleaved where the input was interleaved, as the eager form gives it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks
from .formats import rounded


@triton.jit
def rope_kernel(x, cos, sin, out, T, H, HALF, sxb, sxt, sxh, scb, sct, ssb, sst,
                INTERLEAVED: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Program r: token (r // T, r % T), all of its heads."""
    r = tl.program_id(0)
    b = (r // T).to(tl.int64)
    t = (r % T).to(tl.int64)
    h = tl.arange(0, BH)[:, None]
    i = tl.arange(0, BD)[None, :]
    mask = (h < H) & (i < HALF)
    row = x + b * sxb + t * sxt + h * sxh
    if INTERLEAVED:
        x1 = tl.load(row + 2 * i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(row + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF + i, mask=mask, other=0.0).to(tl.float32)
    dt = x.dtype.element_ty
    c = rounded(tl.load(cos + b * scb + t * sct + i, mask=i < HALF, other=0.0).to(tl.float32), dt)
    s = rounded(tl.load(sin + b * ssb + t * sst + i, mask=i < HALF, other=0.0).to(tl.float32), dt)
    y1 = rounded(rounded(x1 * c, dt) - x2 * s, dt)
    y2 = rounded(rounded(x2 * c, dt) + x1 * s, dt)
    o = out + r.to(tl.int64) * H * 2 * HALF + h * 2 * HALF
    tl.store(o + i, y1.to(out.dtype.element_ty), mask=mask)
    tl.store(o + HALF + i, y2.to(out.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, T, H, D], cos and sin [B, T, D/2] (or broadcastable to it) -> [B, T, H, D] contiguous, as
    layers.rope.apply_rope."""
    device = checks.device_of("x", x)
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [batch, tokens, heads, even head_dim], got {tuple(x.shape)}")
    B, T, H, D = x.shape
    half = D // 2
    if x.dtype not in checks.FLOAT_DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be float32, bfloat16 or float16 with a contiguous last axis, got {x.dtype} "
                         f"strides {tuple(x.stride())}")
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        checks.device_of(name, t, device)
        if t.dim() != 3 or t.shape[-1] != half:
            raise ValueError(f"{name} must be [batch, tokens, {half}], got {tuple(t.shape)}")
        t = t.expand(B, T, half)
        tables.append(t if t.stride(-1) == 1 else t.contiguous())
    cos, sin = tables
    out = torch.empty(B, T, H, D, dtype=x.dtype, device=device)
    if B * T * H:
        rope_kernel[(B * T,)](x, cos, sin, out, T, H, half, x.stride(0), x.stride(1), x.stride(2),
                              cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), INTERLEAVED=interleaved,
                              BH=triton.next_power_of_2(H), BD=triton.next_power_of_2(half), num_warps=4)
    return out
