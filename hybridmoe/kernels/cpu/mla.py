"""One decode step of multi-head latent attention (DeepSeek) on the CPU, in the absorbed form, from the projections'
outputs to the per-head values: the latent's RMSNorm, rope of the query's and the new key's rope parts, the cache
write, and attention over the cached latents. Eager torch spends some twenty small ops per layer on this.

`mla_decode_raw` reads wkv_b's halves as the GGUF file stores them (llama.cpp's attn_k_b and attn_v_b, usually
Q8_0): a quarter of the float32 weights' bytes, the same values, float32 activations (rounding the query and the
latent output to 8 bits too, as llama.cpp does, took the demo model's decode perplexity from 0.85 % to 1.6 % off
exact).

Rope pairs are interleaved on input and de-interleaved on output (as `layers.rope.apply_rope(..., True)`), so the
cached rope keys are the ones prefill writes. Three parallel parts: the key half of wkv_b folded into every head's
query (rows split over threads), attention of all heads together over the cached latents (each cached row read once
per step), the value half unfolded (rows split over threads).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .raw import dequantize_row, half_at

f32 = np.float32
KEYS = 16  # cached keys per task of the scores
COLUMNS = 64  # latent columns per task of the weighted sum
ROWS = 64  # weight rows per task of the absorbed projections


@njit(cache=True, inline="always")
def _rope_interleaved(src, cos, sin, dst):
    """dst = rope(src) for interleaved pairs (2j, 2j + 1), written de-interleaved: dst[j], dst[j + P/2]."""
    half = src.size // 2
    for j in range(half):
        a, b = src[2 * j], src[2 * j + 1]
        dst[j] = a * cos[j] - b * sin[j]
        dst[j + half] = b * cos[j] + a * sin[j]


@njit(cache=True, inline="always")
def _write_key(kv, kv_w, eps, cos, sin, latent_cache, pe_cache, pos):
    """The new token's key into the caches: the latent RMS-normed, the rope part rotated."""
    rank, rope = kv_w.size, pe_cache.shape[1]
    ss = f32(0.0)
    for r in range(rank):
        ss += kv[r] * kv[r]
    inv = f32(1.0) / np.sqrt(ss / f32(rank) + eps)
    for r in range(rank):
        latent_cache[pos, r] = kv[r] * inv * kv_w[r]
    _rope_interleaved(kv[rank:rank + rope], cos, sin, pe_cache[pos])


@njit(cache=True, inline="always")
def _dot(a, b):
    acc = f32(0.0)
    for i in range(a.size):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, inline="always")
def _row_dot(kind, w, x, buf, w32):
    """w's raw row (uint8) . x: Q8_0 straight from its bytes, other kinds through a dequantized row in buf."""
    if kind == 1:
        acc = f32(0.0)
        for b in range(x.size // 32):
            o = b * 34
            s = f32(0.0)
            for j in range(w32):
                s += f32(np.int8(w[o + 2 + j])) * x[b * 32 + j]
            acc += half_at(w, o) * s
        return acc
    dequantize_row(kind, w, buf, w32)
    return _dot(buf, x)


@njit(parallel=True, fastmath=True, cache=True)
def _attend_heads(q_lat, q_rope, cos, sin, latent_cache, pe_cache, n_keys, scale):
    """Every head over keys 0..n_keys-1: softmax(q . keys * scale) @ latents -> [H, R]. The heads go together
    through each cached row, so the cache is read from memory once per step, not once per head: first the scores
    (threads take runs of keys), then the outputs (threads take runs of the latent's columns, a head at a time)."""
    n_heads, rank = q_lat.shape
    rope = pe_cache.shape[1]
    q_pe = np.empty((n_heads, rope), dtype=f32)
    for h in range(n_heads):
        _rope_interleaved(q_rope[h], cos, sin, q_pe[h])
    scores = np.empty((n_heads, n_keys), dtype=f32)
    n_runs = (n_keys + KEYS - 1) // KEYS
    for run in prange(n_runs):
        for t in range(run * KEYS, min(n_keys, (run + 1) * KEYS)):
            for h in range(n_heads):
                scores[h, t] = (_dot(q_lat[h], latent_cache[t]) + _dot(q_pe[h], pe_cache[t])) * scale
    for h in range(n_heads):
        top = -np.inf
        for t in range(n_keys):
            top = max(top, scores[h, t])
        total = f32(0.0)
        for t in range(n_keys):
            e = np.exp(scores[h, t] - top)
            scores[h, t] = e
            total += e
        for t in range(n_keys):
            scores[h, t] /= total
    o_lat = np.empty((n_heads, rank), dtype=f32)
    for c in prange((rank + COLUMNS - 1) // COLUMNS):
        c0 = c * COLUMNS
        width = min(rank, c0 + COLUMNS) - c0
        acc = np.empty(width, dtype=f32)  # one head's run of columns stays in registers over the keys
        for h in range(n_heads):
            acc[:] = 0.0
            for t in range(n_keys):
                p = scores[h, t]
                row = latent_cache[t, c0:c0 + width]
                for r in range(width):
                    acc[r] += p * row[r]
            o_lat[h, c0:c0 + width] = acc
    return o_lat


@njit(parallel=True, fastmath=True, cache=True)
def mla_decode(q, kv, kv_w, eps, cos, sin, w_kv_b, latent_cache, pe_cache, pos, scale, out):
    """q f32 [H, N + P] (wq_b's output per head), kv f32 [R + P] (wkv_a's: the latent, then the rope key), kv_w f32
    [R] (kv_norm's weight), cos, sin f32 [P/2] at the token's position, w_kv_b f32 [H, N + V, R] (key half, then
    value half per head), latent_cache f32 [max_len, R] and pe_cache f32 [max_len, P] of the token's slot, written at
    `pos`; keys 0..pos are attended to -> out f32 [H, V]."""
    n_heads, qk = q.shape
    rank = kv_w.size
    rope = pe_cache.shape[1]
    nope = qk - rope
    v_dim = out.shape[1]
    _write_key(kv, kv_w, eps, cos, sin, latent_cache, pe_cache, pos)
    q_lat = np.zeros((n_heads, rank), dtype=f32)
    for h in prange(n_heads):
        for n in range(nope):
            qn = q[h, n]
            for r in range(rank):
                q_lat[h, r] += qn * w_kv_b[h, n, r]
    o_lat = _attend_heads(q_lat, q[:, nope:], cos, sin, latent_cache, pe_cache, pos + 1, scale)
    for i in prange(n_heads * v_dim):
        h, v = i // v_dim, i % v_dim
        out[h, v] = _dot(o_lat[h], w_kv_b[h, nope + v])


@njit(parallel=True, fastmath=True, cache=True)
def mla_decode_raw(q, kv, kv_w, eps, cos, sin, kind, k_b, v_b, latent_cache, pe_cache, pos, scale, w32, out):
    """mla_decode with wkv_b's halves as the GGUF file stores them: k_b uint8 [H, R, row bytes of N] (q_lat[r] =
    k_b[h, r] . q_nope), v_b uint8 [H, V, row bytes of R] (out[h, v] = v_b[h, v] . o_lat), both of `raw.KIND` kind:
    mla_decode on the dequantized weights, reading a quarter of their bytes at Q8_0 (Q8_0 rows are dotted from
    their bytes, block scale after the block's sum; other kinds through a dequantized row)."""
    n_heads, qk = q.shape
    rank = kv_w.size
    rope = pe_cache.shape[1]
    nope = qk - rope
    v_dim = out.shape[1]
    _write_key(kv, kv_w, eps, cos, sin, latent_cache, pe_cache, pos)
    q_lat = np.empty((n_heads, rank), dtype=f32)
    for task in prange((n_heads * rank + ROWS - 1) // ROWS):
        buf = np.empty(nope, dtype=f32)
        for i in range(task * ROWS, min(n_heads * rank, (task + 1) * ROWS)):
            h, r = i // rank, i % rank
            q_lat[h, r] = _row_dot(kind, k_b[h, r], q[h, :nope], buf, w32)
    o_lat = _attend_heads(q_lat, q[:, nope:], cos, sin, latent_cache, pe_cache, pos + 1, scale)
    for task in prange((n_heads * v_dim + ROWS - 1) // ROWS):
        buf = np.empty(rank, dtype=f32)
        for i in range(task * ROWS, min(n_heads * v_dim, (task + 1) * ROWS)):
            h, v = i // v_dim, i % v_dim
            out[h, v] = _row_dot(kind, v_b[h, v], o_lat[h], buf, w32)
