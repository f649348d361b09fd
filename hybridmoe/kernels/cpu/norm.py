"""RMSNorm of a few rows, optionally after adding a residual, in one call.

Decode runs two norms and two residual adds per layer, each right after a kernel that has streamed weights through
the caches. torch's ops then pay tens of microseconds for cold code apiece (its dispatcher is large); this small
loop pays a few.
"""
from __future__ import annotations

import numpy as np
from numba import njit

f32 = np.float32
FAST = {"nsz", "arcp", "contract", "reassoc"}  # reassociation vectorises the sum of squares


@njit(fastmath=FAST, cache=True)
def add_rms_norm(x, h, w, eps, total, out):
    """x, h f32 [n, D] (h empty: no residual), w f32 [D] -> total = x + h (skipped without h), out = rmsnorm(total)
    * w; the normalised row times w as torch's rms_norm computes it (x * rsqrt(mean(x^2) + eps) * w)."""
    n, dim = x.shape
    for t in range(n):
        ss = f32(0.0)
        for j in range(dim):
            v = x[t, j] + h[t, j] if h.size else x[t, j]
            if h.size:
                total[t, j] = v
            ss += v * v
        r = f32(1.0) / np.sqrt(ss / f32(dim) + eps)
        for j in range(dim):
            v = total[t, j] if h.size else x[t, j]
            out[t, j] = v * r * w[j]
