"""One decode step of grouped-query attention on the CPU, from the stacked q/k/v projection output to the attention
output: the optional q/k RMSNorm, rope (half-split pairs), the cache write of the new key and value, and attention of
each query head over all cached keys. Eager torch spends some sixty small ops per layer on this; one call does it.

Parallel over kv heads: each task reads its head's cached keys and values once for its H/Hk query heads, the keys
2 query heads x 4 keys at a time and the values 4 query heads per loaded run of a row (`mla.py`'s register blocks).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mla import _acc_2x4, _tail, _weighted_4
from .simd import fzero, hsum

f32 = np.float32
COLUMNS = 32  # value columns per pass of the weighted sum (2 vectors, 4 query heads at a time)


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


@njit(cache=True, inline="always")
def _scores(qf, kf, base, stride, dim, group, n_keys, scale, scores):
    """scores[g, t] = q[g] . key t * scale for one kv head's query heads (qf: their rows flat; key t at base + t *
    stride of kf): 2 query heads x 4 keys at a time, each vector of both loaded once for the 8 products."""
    last, heads = n_keys - 1, group - 1
    z = fzero()
    for t in range(0, n_keys, 4):  # past the last key or head: it again, stored over itself
        ts = (t, min(t + 1, last), min(t + 2, last), min(t + 3, last))
        o0, o1, o2, o3 = base + ts[0] * stride, base + ts[1] * stride, base + ts[2] * stride, base + ts[3] * stride
        for g in range(0, group, 2):
            gb = min(g + 1, heads)
            acc = _acc_2x4((z, z, z, z, z, z, z, z), qf, g * dim, gb * dim, kf, o0, o1, o2, o3, dim)
            a0, a1, a2, a3, b0, b1, b2, b3 = acc
            scores[g, ts[0]] = (hsum(a0) + _tail(qf, g * dim, kf, o0, dim)) * scale
            scores[g, ts[1]] = (hsum(a1) + _tail(qf, g * dim, kf, o1, dim)) * scale
            scores[g, ts[2]] = (hsum(a2) + _tail(qf, g * dim, kf, o2, dim)) * scale
            scores[g, ts[3]] = (hsum(a3) + _tail(qf, g * dim, kf, o3, dim)) * scale
            scores[gb, ts[0]] = (hsum(b0) + _tail(qf, gb * dim, kf, o0, dim)) * scale
            scores[gb, ts[1]] = (hsum(b1) + _tail(qf, gb * dim, kf, o1, dim)) * scale
            scores[gb, ts[2]] = (hsum(b2) + _tail(qf, gb * dim, kf, o2, dim)) * scale
            scores[gb, ts[3]] = (hsum(b3) + _tail(qf, gb * dim, kf, o3, dim)) * scale


@njit(parallel=True, fastmath=True, cache=True)
def gqa_decode(qkv, n_heads, q_w, k_w, eps, cos, sin, k_cache, v_cache, pos, scale, out):
    """qkv f32 [(H + 2 Hk) * D] (q heads, k heads, v heads); q_w, k_w [D] or empty; cos, sin [D/2];
    k_cache, v_cache f32 [max_len, Hk, D] (one slot), the new token at `pos`; out f32 [H * D]."""
    n_kv, dim = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    n_keys = pos + 1
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    stride = n_kv * dim
    body = dim - dim % COLUMNS
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
        _scores(q.reshape(-1), kf, h * dim, stride, dim, group, n_keys, scale, scores)
        for g in range(group):
            top = scores[g].max()
            total = f32(0.0)
            for t in range(n_keys):
                e = np.exp(scores[g, t] - top)
                scores[g, t] = e
                total += e
            scores[g] *= f32(1.0) / total
        o = np.empty(group * dim, dtype=f32)
        heads = group - 1
        for c0 in range(0, body, COLUMNS):  # 4 query heads per loaded run of a cached value row
            for g in range(0, group, 4):
                _weighted_4(scores, g, min(g + 1, heads), min(g + 2, heads), min(g + 3, heads), vf, h * dim + c0,
                            stride, n_keys, o, dim, c0)
        for g in range(group):
            for c in range(body, dim):
                acc = f32(0.0)
                for t in range(n_keys):
                    acc += scores[g, t] * vf[h * dim + t * stride + c]
                o[g * dim + c] = acc
        out[h * group * dim:(h + 1) * group * dim] = o
