"""Rotary position embedding in one launch, for activations on the GPU.

`layers.rope.apply_rope` in eager torch is seven kernels (cos and sin cast to x's dtype, two products, two
multiply-adds, a concatenation), run for queries and keys in every layer. Same arithmetic here: cos and sin rounded
to x's dtype, x1 c and x2 c rounded, then x1 c - x2 s and x2 c + x1 s each rounded once; the output is contiguous,
its halves de-interleaved where the input was interleaved, as the eager form gives it.

`norm_rope` also runs the per-head RMSNorm that Qwen3's queries and keys take before the rotation (q_norm,
k_norm), in the same launch: the arithmetic of kernels.gpu.norm (the head's row in float32, times rsqrt(mean of
squares + eps), rounded, times the weight, rounded), then the rotation of the result. Two launches per layer
instead of four.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import checks
from .formats import rounded


@triton.jit
def rope_kernel(x, cos, sin, out, w, eps, T, H, HALF, sxb, sxt, sxh, scb, sct, ssb, sst,
                INTERLEAVED: tl.constexpr, NORM: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Program r: token (r // T, r % T), all of its heads. NORM: each head's row is RMS-normalised with weight w
    [2 * HALF] first (w's dtype is x's)."""
    r = tl.program_id(0)
    b = (r // T).to(tl.int64)
    t = (r % T).to(tl.int64)
    h = tl.arange(0, BH)[:, None]
    i = tl.arange(0, BD)[None, :]
    mask = (h < H) & (i < HALF)
    row = x + b * sxb + t * sxt + h * sxh
    if INTERLEAVED:
        at1, at2 = 2 * i, 2 * i + 1
    else:
        at1, at2 = i, HALF + i
    x1 = tl.load(row + at1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + at2, mask=mask, other=0.0).to(tl.float32)
    dt = x.dtype.element_ty
    if NORM:
        inv = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w + at1, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w + at2, mask=i < HALF, other=0.0).to(tl.float32)
        x1 = rounded(w1 * rounded(x1 * inv, dt), dt)
        x2 = rounded(w2 * rounded(x2 * inv, dt), dt)
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
    return _rope(x, cos, sin, interleaved, None, 0.0)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
              interleaved: bool) -> torch.Tensor:
    """rope of the RMSNorm (weight [D], of x's dtype) of each head's row of x: as layers.rope.apply_rope of
    layers.norm.RMSNorm's output, in one launch."""
    checks.device_of("weight", weight, checks.device_of("x", x))
    if weight.dtype != x.dtype or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be {x.dtype} ({x.shape[-1]},) like x's heads, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    return _rope(x, cos, sin, interleaved, weight.contiguous(), eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, weight: torch.Tensor | None,
          eps: float) -> torch.Tensor:
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
        rope_kernel[(B * T,)](x, cos, sin, out, x if weight is None else weight, float(eps), T, H, half,
                              x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), sin.stride(0),
                              sin.stride(1), INTERLEAVED=interleaved, NORM=weight is not None,
                              BH=triton.next_power_of_2(H), BD=triton.next_power_of_2(half), num_warps=4)
    return out
