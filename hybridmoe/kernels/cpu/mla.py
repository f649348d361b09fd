"""One decode step of multi-head latent attention (DeepSeek) on the CPU, in the absorbed form, from the projections'
outputs to the per-head values: the latent's RMSNorm, rope of the query's and the new key's rope parts, the cache
write, and attention over the cached latents. Eager torch spends some twenty small ops per layer on this.

`mla_decode_raw` reads wkv_b's halves as the GGUF file stores them (llama.cpp's attn_k_b and attn_v_b, usually
Q8_0): a quarter of the float32 weights' bytes, the same values, float32 activations (rounding the query and the
latent output to 8 bits too, as llama.cpp does, took the demo model's decode perplexity from 0.85 % to 1.6 % off
exact).

Rope pairs are interleaved on input and de-interleaved on output (as `layers.rope.apply_rope(..., True)`), so the
cached rope keys are the ones prefill writes. Parallel over heads: each task folds its head's key half of wkv_b into
its query, attends over the cached latents (read from L2 after the first head) and unfolds its value half.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .raw import dequantize_row

f32 = np.float32


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
def _attend(q_lat, q_rope, cos, sin, latent_cache, pe_cache, n_keys, scale):
    """One head over keys 0..n_keys-1: softmax(q . keys * scale) @ latents -> the head's output latent [R]."""
    rank, rope = q_lat.size, pe_cache.shape[1]
    q_pe = np.empty(rope, dtype=f32)
    _rope_interleaved(q_rope, cos, sin, q_pe)
    scores = np.empty(n_keys, dtype=f32)
    top = -np.inf
    for t in range(n_keys):
        acc = f32(0.0)
        for r in range(rank):
            acc += q_lat[r] * latent_cache[t, r]
        for j in range(rope):
            acc += q_pe[j] * pe_cache[t, j]
        s = acc * scale
        scores[t] = s
        top = max(top, s)
    total = f32(0.0)
    for t in range(n_keys):
        e = np.exp(scores[t] - top)
        scores[t] = e
        total += e
    o_lat = np.zeros(rank, dtype=f32)
    for t in range(n_keys):
        p = scores[t] / total
        for r in range(rank):
            o_lat[r] += p * latent_cache[t, r]
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
    n_keys = pos + 1
    for h in prange(n_heads):
        q_lat = np.zeros(rank, dtype=f32)
        for n in range(nope):
            qn = q[h, n]
            for r in range(rank):
                q_lat[r] += qn * w_kv_b[h, n, r]
        o_lat = _attend(q_lat, q[h, nope:], cos, sin, latent_cache, pe_cache, n_keys, scale)
        for v in range(v_dim):
            acc = f32(0.0)
            for r in range(rank):
                acc += o_lat[r] * w_kv_b[h, nope + v, r]
            out[h, v] = acc


@njit(parallel=True, fastmath=True, cache=True)
def mla_decode_raw(q, kv, kv_w, eps, cos, sin, kind, k_b, v_b, latent_cache, pe_cache, pos, scale, w32, out):
    """mla_decode with wkv_b's halves as the GGUF file stores them: k_b uint8 [H, R, row bytes of N] (q_lat[r] =
    k_b[h, r] . q_nope), v_b uint8 [H, V, row bytes of R] (out[h, v] = v_b[h, v] . o_lat), both of `raw.KIND` kind.
    Each row is dequantized into a small buffer (bit-exact with the file's values) and dotted in float32, so this
    is mla_decode on the dequantized weights, reading a quarter of their bytes at Q8_0."""
    n_heads, qk = q.shape
    rank = kv_w.size
    rope = pe_cache.shape[1]
    nope = qk - rope
    v_dim = out.shape[1]
    _write_key(kv, kv_w, eps, cos, sin, latent_cache, pe_cache, pos)
    n_keys = pos + 1
    for h in prange(n_heads):
        k_row = np.empty(nope, dtype=f32)
        q_lat = np.empty(rank, dtype=f32)
        for r in range(rank):
            dequantize_row(kind, k_b[h, r], k_row, w32)
            acc = f32(0.0)
            for n in range(nope):
                acc += k_row[n] * q[h, n]
            q_lat[r] = acc
        o_lat = _attend(q_lat, q[h, nope:], cos, sin, latent_cache, pe_cache, n_keys, scale)
        v_row = np.empty(rank, dtype=f32)
        for v in range(v_dim):
            dequantize_row(kind, v_b[h, v], v_row, w32)
            acc = f32(0.0)
            for r in range(rank):
                acc += v_row[r] * o_lat[r]
            out[h, v] = acc
