"""Softmax top-k routing of a few tokens in one call: the router's logits (float32 dot products), the softmax, the k
best experts and their weights.

Eager torch spends about seven small ops per MoE layer on this. At decode each of them runs right after the experts'
kernels have streamed their weights through the caches, so each pays for cold code and data (tens of microseconds
apiece on a 2-core VM); one call pays once, and both threads read the router's rows (1 MB at 128 x 2048) from DRAM.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32
# Reassociation vectorises the dot products; no approximate functions, so exp is the exact one.
FAST = {"nsz", "arcp", "contract", "reassoc"}


@njit(parallel=True, fastmath=FAST, cache=True)
def softmax_topk(x, w, renorm, scaling, ids, weights):
    """x f32 [n, D], w f32 [E, D] -> ids int64 [n, K] (best first; ties to the lower id) and weights f32 [n, K]: the
    chosen softmax scores, divided by their sum (+ 1e-20) if renorm, times scaling."""
    n, dim = x.shape
    n_experts, top_k = w.shape[0], ids.shape[1]
    logits = np.empty((n, n_experts), dtype=f32)
    for e in prange(n_experts):
        for t in range(n):
            acc = f32(0.0)
            for j in range(dim):
                acc += x[t, j] * w[e, j]
            logits[t, e] = acc
    scores = np.empty(n_experts, dtype=f32)
    taken = np.empty(n_experts, dtype=np.bool_)
    for t in range(n):
        top = logits[t].max()
        total = f32(0.0)
        for e in range(n_experts):
            scores[e] = np.exp(logits[t, e] - top)
            total += scores[e]
        for e in range(n_experts):
            scores[e] /= total
        taken[:] = False
        picked = f32(0.0)
        for k in range(top_k):
            best = -1
            for e in range(n_experts):
                if not taken[e] and (best < 0 or scores[e] > scores[best]):
                    best = e
            taken[best] = True
            ids[t, k] = best
            weights[t, k] = scores[best]
            picked += scores[best]
        for k in range(top_k):
            v = weights[t, k] / (picked + f32(1e-20)) if renorm else weights[t, k]
            weights[t, k] = v * scaling
