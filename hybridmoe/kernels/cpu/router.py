"""Top-k routing of a few tokens in one call: the router's logits (float32 dot products), softmax or sigmoid scores,
the optional group limit (DeepSeek's grouped top-k, with or without its correction bias), the k best experts and
their weights.

Eager torch spends seven (softmax) to seventeen (DeepSeek-V3's grouped sigmoid) small ops per MoE layer on this. At
decode each of them runs right after the experts' kernels have streamed their weights through the caches, so each
pays for cold code and data (tens of microseconds apiece on a 2-core VM); one call pays once, and both threads read
the router's rows (1 MB at 128 x 2048) from DRAM.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32
# Reassociation vectorises the dot products; no approximate functions, so exp is the exact one.
FAST = {"nsz", "arcp", "contract", "reassoc"}


@njit(cache=True, inline="always")
def _best(values, taken, lo, hi):
    """The index in [lo, hi) of the largest value not taken (ties to the lower index); -1 if all are taken."""
    best = -1
    for e in range(lo, hi):
        if not taken[e] and (best < 0 or values[e] > values[best]):
            best = e
    return best


@njit(parallel=True, fastmath=FAST, cache=True)
def route(x, w, bias, sigmoid, n_group, topk_group, top2_groups, fill, renorm, scaling, ids, weights):
    """x f32 [n, D], w f32 [E, D] -> ids int64 [n, K] (best first; ties to the lower id), weights f32 [n, K].

    Scores are softmax (sigmoid=False) or sigmoid of the logits; experts are chosen by score + bias (bias f32 [E], or
    empty). With n_group > 1 only the topk_group groups with the highest group score (the sum of their two best
    (top2_groups) or their best choice value) compete; the others' choice values become `fill`. weights are the
    chosen experts' scores, divided by their sum (+ 1e-20) if renorm, times scaling."""
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
    choice = np.empty(n_experts, dtype=f32)
    taken = np.empty(n_experts, dtype=np.bool_)
    size = n_experts // n_group
    group_score = np.empty(n_group, dtype=f32)
    kept = np.empty(n_group, dtype=np.bool_)
    for t in range(n):
        if sigmoid:
            for e in range(n_experts):
                scores[e] = f32(1.0) / (f32(1.0) + np.exp(-logits[t, e]))
        else:
            top = logits[t].max()
            total = f32(0.0)
            for e in range(n_experts):
                scores[e] = np.exp(logits[t, e] - top)
                total += scores[e]
            for e in range(n_experts):
                scores[e] /= total
        for e in range(n_experts):
            choice[e] = scores[e] + bias[e] if bias.size else scores[e]
        if n_group > 1:
            taken[:] = False
            for gr in range(n_group):
                first = _best(choice, taken, gr * size, (gr + 1) * size)
                s = choice[first]
                if top2_groups:
                    taken[first] = True
                    s += choice[_best(choice, taken, gr * size, (gr + 1) * size)]
                group_score[gr] = s
            kept[:] = False
            for _ in range(topk_group):
                best = -1
                for gr in range(n_group):
                    if not kept[gr] and (best < 0 or group_score[gr] > group_score[best]):
                        best = gr
                kept[best] = True
            for e in range(n_experts):
                if not kept[e // size]:
                    choice[e] = fill
        taken[:] = False
        picked = f32(0.0)
        for k in range(top_k):
            best = _best(choice, taken, 0, n_experts)
            taken[best] = True
            ids[t, k] = best
            weights[t, k] = scores[best]
            picked += scores[best]
        for k in range(top_k):
            v = weights[t, k] / (picked + f32(1e-20)) if renorm else weights[t, k]
            weights[t, k] = v * scaling
