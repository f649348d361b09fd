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

from .raw import dequantize_row
from .simd import add, fma, fzero, hsum, load_floats, load_half, load_i8_floats, mul, store_floats

f32 = np.float32
KEYS = 16  # cached keys per task of the scores
COLUMNS = 32  # latent columns per task of the weighted sum (2 vectors)
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
def _dot(a, ao, b, bo, n):
    """a[ao:ao + n] . b[bo:bo + n] of flat float32 arrays: 16 lanes (two accumulators), then the tail. Hot loops
    index rather than make views (each view counts its array's references up and down)."""
    a0 = fzero()
    a1 = fzero()
    body = n - n % 32
    for i in range(0, body, 32):
        a0 = fma(load_floats(a, ao + i), load_floats(b, bo + i), a0)
        a1 = fma(load_floats(a, ao + i + 16), load_floats(b, bo + i + 16), a1)
    acc = hsum(add(a0, a1))
    for i in range(body, n):
        acc += a[ao + i] * b[bo + i]
    return acc


@njit(cache=True, inline="always")
def _row_dot(kind, w, o, row_bytes, x, xo, n, buf, w32):
    """The raw row at byte o of flat w (uint8) . x[xo:xo + n] (float32): Q8_0 straight from its bytes (each
    block's 32 products summed in 16 lanes, then times its scale), other kinds through a dequantized row in buf."""
    if kind == 1:
        acc = fzero()
        for b in range(n // 32):
            ob = o + b * 34
            s = mul(load_i8_floats(w, ob + 2), load_floats(x, xo + b * 32))
            s = fma(load_i8_floats(w, ob + 18), load_floats(x, xo + b * 32 + 16), s)
            acc = fma(s, load_half(w, ob), acc)
        return hsum(acc)
    dequantize_row(kind, w[o:o + row_bytes], buf, w32)
    return _dot(buf, 0, x, xo, n)


@njit(cache=True, inline="always")
def _acc_2x4(acc, q, qa, qb, k, o0, o1, o2, o3, n):
    """acc (8 vectors: head a with keys 0-3, then head b) plus q[qa + i] * k[o + i] and q[qb + i] * k[o + i] over
    the whole vectors of n columns (flat float32 arrays; the offsets are the rows' starts)."""
    a0, a1, a2, a3, b0, b1, b2, b3 = acc
    for i in range(0, n - n % 16, 16):
        va, vb = load_floats(q, qa + i), load_floats(q, qb + i)
        k0, k1, k2, k3 = load_floats(k, o0 + i), load_floats(k, o1 + i), load_floats(k, o2 + i), load_floats(k, o3 + i)
        a0, a1, a2, a3 = fma(va, k0, a0), fma(va, k1, a1), fma(va, k2, a2), fma(va, k3, a3)
        b0, b1, b2, b3 = fma(vb, k0, b0), fma(vb, k1, b1), fma(vb, k2, b2), fma(vb, k3, b3)
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(cache=True, inline="always")
def _tail(q, qo, k, ko, n):
    """q[qo + i] * k[ko + i] summed over the columns past n's whole vectors."""
    total = f32(0.0)
    for i in range(n - n % 16, n):
        total += q[qo + i] * k[ko + i]
    return total


@njit(cache=True, inline="always")
def _store(scores, ql, qp, lat, pe, rank, rope, h, t, acc, scale):
    """scores[h, t] from its accumulated vector and the columns past the whole vectors."""
    scores[h, t] = (hsum(acc) + _tail(ql, h * rank, lat, t * rank, rank) + _tail(qp, h * rope, pe, t * rope, rope)) \
        * scale


@njit(cache=True, inline="always")
def _scores_2x4(ql, qp, lat, pe, rank, rope, ha, hb, t0, t1, t2, t3, scale, scores):
    """scores[h, t] = (q_lat[h] . latent[t] + q_pe[h] . pe[t]) * scale for 2 heads x 4 keys (flat arrays): each
    vector of the 2 queries and the 4 keys is loaded once for the 8 products (a repeated head or key is computed
    again and stored over itself)."""
    z = fzero()
    acc = _acc_2x4((z, z, z, z, z, z, z, z), ql, ha * rank, hb * rank, lat, t0 * rank, t1 * rank, t2 * rank,
                   t3 * rank, rank)
    acc = _acc_2x4(acc, qp, ha * rope, hb * rope, pe, t0 * rope, t1 * rope, t2 * rope, t3 * rope, rope)
    a0, a1, a2, a3, b0, b1, b2, b3 = acc
    _store(scores, ql, qp, lat, pe, rank, rope, ha, t0, a0, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, ha, t1, a1, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, ha, t2, a2, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, ha, t3, a3, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, hb, t0, b0, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, hb, t1, b1, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, hb, t2, b2, scale)
    _store(scores, ql, qp, lat, pe, rank, rope, hb, t3, b3, scale)


@njit(cache=True, inline="always")
def _weighted_4(scores, h0, h1, h2, h3, rows, at, stride, n_keys, out, width, column):
    """out[h * width + column + j] = sum over t of scores[h, t] * rows[at + t * stride + j], j < 32, for 4 heads
    (flat float32 rows and out; a repeated head is computed again and stored over itself): each run of 32 of a
    row is loaded once for the 4."""
    a0, a1, b0, b1 = fzero(), fzero(), fzero(), fzero()
    e0, e1, f0, f1 = fzero(), fzero(), fzero(), fzero()
    for t in range(n_keys):
        o = at + t * stride
        v0, v1 = load_floats(rows, o), load_floats(rows, o + 16)
        a0, a1 = fma(v0, scores[h0, t], a0), fma(v1, scores[h0, t], a1)
        b0, b1 = fma(v0, scores[h1, t], b0), fma(v1, scores[h1, t], b1)
        e0, e1 = fma(v0, scores[h2, t], e0), fma(v1, scores[h2, t], e1)
        f0, f1 = fma(v0, scores[h3, t], f0), fma(v1, scores[h3, t], f1)
    for h, x0, x1 in ((h0, a0, a1), (h1, b0, b1), (h2, e0, e1), (h3, f0, f1)):
        store_floats(out, h * width + column, x0)
        store_floats(out, h * width + column + 16, x1)


@njit(parallel=True, fastmath=True, cache=True)
def _attend_heads(q_lat, q_rope, cos, sin, latent_cache, pe_cache, n_keys, scale):
    """Every head over keys 0..n_keys-1: softmax(q . keys * scale) @ latents -> [H, R]. The heads go together
    through the cached rows, so the cache is read from memory once per step, not once per head: first the scores
    (threads take runs of keys, 2 heads x 4 keys at a time), the softmax (threads take heads), then the outputs
    (threads take runs of the latent's columns; each run of a cached row is loaded once for 4 heads)."""
    n_heads, rank = q_lat.shape
    rope = pe_cache.shape[1]
    q_pe = np.empty((n_heads, rope), dtype=f32)
    for h in range(n_heads):
        _rope_interleaved(q_rope[h], cos, sin, q_pe[h])
    ql, qp = q_lat.reshape(-1), q_pe.reshape(-1)
    lat, pe = latent_cache.reshape(-1), pe_cache.reshape(-1)
    scores = np.empty((n_heads, n_keys), dtype=f32)
    last, heads = n_keys - 1, n_heads - 1
    for run in prange((n_keys + KEYS - 1) // KEYS):
        for t in range(run * KEYS, min(n_keys, (run + 1) * KEYS), 4):  # past the last key or head: it again
            for h in range(0, n_heads, 2):
                _scores_2x4(ql, qp, lat, pe, rank, rope, h, min(h + 1, heads), t, min(t + 1, last),
                            min(t + 2, last), min(t + 3, last), scale, scores)
    for h in prange(n_heads):
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
    ol = o_lat.reshape(-1)
    for c in prange((rank + COLUMNS - 1) // COLUMNS):
        c0 = c * COLUMNS
        width = min(rank, c0 + COLUMNS) - c0
        if width < COLUMNS:
            for h in range(n_heads):
                for r in range(width):
                    acc = f32(0.0)
                    for t in range(n_keys):
                        acc += scores[h, t] * lat[t * rank + c0 + r]
                    ol[h * rank + c0 + r] = acc
            continue
        for h in range(0, n_heads, 4):  # 4 heads' runs of columns in registers over the keys (past the last: it)
            _weighted_4(scores, h, min(h + 1, heads), min(h + 2, heads), min(h + 3, heads), lat, c0, rank, n_keys,
                        ol, rank, c0)
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
    o_lat = _attend_heads(q_lat, q[:, nope:], cos, sin, latent_cache, pe_cache, pos + 1, scale).reshape(-1)
    w = w_kv_b.reshape(-1)
    for i in prange(n_heads * v_dim):
        h, v = i // v_dim, i % v_dim
        out[h, v] = _dot(o_lat, h * rank, w, (h * (nope + v_dim) + nope + v) * rank, rank)


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
    kf, vf, qf = k_b.reshape(-1), v_b.reshape(-1), q.reshape(-1)
    k_row, v_row = k_b.shape[2], v_b.shape[2]
    for task in prange((n_heads * rank + ROWS - 1) // ROWS):
        buf = np.empty(nope, dtype=f32)
        for i in range(task * ROWS, min(n_heads * rank, (task + 1) * ROWS)):
            h, r = i // rank, i % rank
            q_lat[h, r] = _row_dot(kind, kf, i * k_row, k_row, qf, h * qk, nope, buf, w32)
    o_lat = _attend_heads(q_lat, q[:, nope:], cos, sin, latent_cache, pe_cache, pos + 1, scale).reshape(-1)
    for task in prange((n_heads * v_dim + ROWS - 1) // ROWS):
        buf = np.empty(rank, dtype=f32)
        for i in range(task * ROWS, min(n_heads * v_dim, (task + 1) * ROWS)):
            h = i // v_dim
            out[h, i % v_dim] = _row_dot(kind, vf, i * v_row, v_row, o_lat, h * rank, rank, buf, w32)
