"""One decode step of grouped-query attention on the CPU, from the stacked q/k/v projection output to the attention
output: the optional q/k RMSNorm, rope (half-split pairs), the cache write of the new key and value, and attention of
each query head over all cached keys. Eager torch spends some sixty small ops per layer on this; one call does it.

Parallel over kv heads: each task reads its head's cached keys and values once for its H/Hk query heads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32
# Keys (then values) are copied a block at a time into a small buffer before use: the cache rows of one kv head are
# strided, and loading a block's rows back to back lets the CPU fetch them from DRAM in parallel (about 30% faster
# than walking them one at a time when the cache is cold, as it is after the experts' kernels).
KEY_BLOCK = 16


@njit(cache=True, inline="always")
def _norm_rope(src, w, eps, cos, sin, dst):
    """dst = rope(rmsnorm(src) * w) for one head (w empty: no norm); half-split pairs (j, j + D/2)."""
    n = src.size
    half = n // 2
    r = f32(1.0)
    if w.size:
        ss = f32(0.0)
        for j in range(n):
            ss += src[j] * src[j]
        r = f32(1.0) / np.sqrt(ss / f32(n) + eps)
    for j in range(half):
        a, b = src[j] * r, src[j + half] * r
        if w.size:
            a, b = a * w[j], b * w[j + half]
        dst[j] = a * cos[j] - b * sin[j]
        dst[j + half] = b * cos[j] + a * sin[j]


@njit(parallel=True, fastmath=True, cache=True)
def gqa_decode(qkv, n_heads, q_w, k_w, eps, cos, sin, k_cache, v_cache, pos, scale, out):
    """qkv f32 [(H + 2 Hk) * D] (q heads, k heads, v heads); q_w, k_w [D] or empty; cos, sin [D/2];
    k_cache, v_cache f32 [max_len, Hk, D] (one slot), the new token at `pos`; out f32 [H * D]."""
    n_kv, dim = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    n_keys = pos + 1
    for h in prange(n_kv):
        k_at = (n_heads + h) * dim
        v_at = (n_heads + n_kv + h) * dim
        _norm_rope(qkv[k_at:k_at + dim], k_w, eps, cos, sin, k_cache[pos, h])
        v_cache[pos, h, :] = qkv[v_at:v_at + dim]
        q = np.empty((group, dim), dtype=f32)
        for g in range(group):
            q_at = (h * group + g) * dim
            _norm_rope(qkv[q_at:q_at + dim], q_w, eps, cos, sin, q[g])
        scores = np.empty((group, n_keys), dtype=f32)
        rows = np.empty((KEY_BLOCK, dim), dtype=f32)
        for t0 in range(0, n_keys, KEY_BLOCK):
            nt = min(KEY_BLOCK, n_keys - t0)
            for tt in range(nt):  # a block of keys into L1 first: independent loads, reused by every query head
                for j in range(dim):
                    rows[tt, j] = k_cache[t0 + tt, h, j]
            for g in range(group):
                for tt in range(nt):
                    acc = f32(0.0)
                    for j in range(dim):
                        acc += q[g, j] * rows[tt, j]
                    scores[g, t0 + tt] = acc * scale
        for g in range(group):
            top = scores[g].max()
            total = f32(0.0)
            for t in range(n_keys):
                e = np.exp(scores[g, t] - top)
                scores[g, t] = e
                total += e
            scores[g] *= f32(1.0) / total
        o = np.zeros((group, dim), dtype=f32)
        for t0 in range(0, n_keys, KEY_BLOCK):
            nt = min(KEY_BLOCK, n_keys - t0)
            for tt in range(nt):
                for j in range(dim):
                    rows[tt, j] = v_cache[t0 + tt, h, j]
            for tt in range(nt):
                for g in range(group):
                    p = scores[g, t0 + tt]
                    for j in range(dim):
                        o[g, j] += p * rows[tt, j]
        for g in range(group):
            out[(h * group + g) * dim:(h * group + g + 1) * dim] = o[g]
