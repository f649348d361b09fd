"""The weighted sum of a decode step's expert outputs, in the order `layers.moe.combine` sums them (each product
rounded to float32, then added one expert at a time), so either gives the same bits. One call replaces a copy and
four torch ops per MoE layer."""
from __future__ import annotations

import numpy as np
from numba import njit

f32 = np.float32


@njit(cache=True)
def weighted_sum(y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """y f32 [G, n, >= D] (columns past D are ignored), w f32 [n, G] -> out f32 [n, D] = sum_g w[:, g] * y[g]."""
    n_experts, n, dim = y.shape[0], out.shape[0], out.shape[1]
    for t in range(n):
        for j in range(dim):
            out[t, j] = f32(0.0)
        for g in range(n_experts):
            wg = w[t, g]
            for j in range(dim):
                out[t, j] += y[g, t, j] * wg
