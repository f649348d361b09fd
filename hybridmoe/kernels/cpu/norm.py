"""RMSNorm of a few rows, optionally after adding a residual, in one call.

Decode runs two norms and two residual adds per layer, each right after a kernel that has streamed weights through
the caches. torch's ops then pay tens of microseconds for cold code apiece (its dispatcher is large); this small
loop pays a few. The sum of squares runs in 16 explicit lanes summed in a fixed order (no reassociation left to the
compiler), so the bits are the same wherever the kernel is compiled in: alone, or inside a decode block
(`blocks.py`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .simd import fma, fzero, hsum, load_floats

f32 = np.float32
LANES = 16


@njit(cache=True)
def add_rms_norm(x, h, w, eps, total, out):
    """x, h f32 [n, D] (h empty: no residual), w f32 [D] -> total = x + h (skipped without h), out = rmsnorm(total)
    * w; the normalised row times w as torch's rms_norm computes it (x * rsqrt(mean(x^2) + eps) * w)."""
    n, dim = x.shape
    body = dim - dim % LANES
    for t in range(n):
        src = x[t]
        if h.size:
            for j in range(dim):
                total[t, j] = x[t, j] + h[t, j]
            src = total[t]
        acc = fzero()
        for j in range(0, body, LANES):
            v = load_floats(src, j)
            acc = fma(v, v, acc)
        ss = hsum(acc)
        for j in range(body, dim):
            ss += src[j] * src[j]
        r = f32(1.0) / np.sqrt(ss / f32(dim) + eps)
        for j in range(dim):
            out[t, j] = src[j] * r * w[j]
