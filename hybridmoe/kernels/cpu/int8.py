"""Decode kernels with 8-bit activations over the 16-lane "quad" layout of `repack.py` (activations="int8").

x is rounded to int8 with one float32 scale per group of 32 (as llama.cpp's Q8_0 activations), once per call. Every
tile is 16 output rows (one vector lane each); its quantized weights are stored as 32-bit words holding 4
consecutive K positions of one row, so one `dpbusd` multiplies 16 rows x 4 positions by 4 activation bytes and sums
them exactly in int32 (`simd.py`). Sums are turned into float once per group of 32 (16 for Q6_K's scales).
Weights must be unsigned bytes there: Q8_0 is stored + 128, and the offsets (Q8_0's 128, Q4_0's 8, Q6_K's 32) come
back out through the integer sums of x per group, as do the mins of Q4_K / Q5_K. So every kernel computes exactly
(up to float32 rounding) rounded(x) @ W.T, rounded(x) being x after the 8-bit rounding.

Tile layouts, per block of one tile (words are rows of 64 bytes: 16 lanes x 4 positions):
    Q4_0  q: 4 words of nibbles (low: positions 0-15, high: 16-31)            d: 16 f32
    Q8_0  q: 8 words of int8 + 128                                            d: 16 f32
    Q4_K  q: 32 words of nibbles (chunk c of 64: low -> group 2c, high -> 2c+1)  s: scales, mins [2, 8, 16] u8
          d: d, dmin [2, 16] f32
    Q5_K  q: as Q4_K + 8 words of fifth bits (bit g -> group g)               s, d: as Q4_K
    Q6_K  q: 32 words of GGUF's ql + 16 words of qh, GGUF's order otherwise   s: [16, 16] int8   d: 16 f32
Rows past N in the last tile are zero; their outputs are computed and dropped by the wrappers.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .combine import weighted_sum
from .simd import bits, bor, dpbusd, fma, fzero, izero, load_floats, load_i8_floats, load_u8_floats, load_words, mul, \
    store_floats, sub, to_floats

f32 = np.float32
LANES = 16
M4 = 0x0F0F0F0F  # low nibble of every byte
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True)
def quantize(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xqs: np.ndarray) -> None:
    """x f32 [n, K] -> xq int8 [n, K] with scales xd [n, K/32] (x ~ xd * xq, xd = max |x| / 127 per group) and the
    integer sums xqs [n, K/16] of xq."""
    n, k_dim = xq.shape
    for t in range(n):
        for g in range(k_dim // 32):
            amax = f32(0.0)
            finite = True
            for j in range(32):
                a = abs(x[t, g * 32 + j])
                amax = max(amax, a)
                finite &= a <= FLOAT32_MAX  # false for NaN and inf, which max() would drop
            # a NaN or infinite input makes its group's scale NaN, so that every product it enters is NaN
            d = amax / f32(127.0) if finite else f32(np.nan)
            inv = f32(127.0) / amax if finite and amax > 0 else f32(0.0)
            for half in range(2):
                isum = 0
                for j in range(16):
                    q = np.int8(np.rint(x[t, g * 32 + half * 16 + j] * inv))
                    xq[t, g * 32 + half * 16 + j] = q
                    isum += q
                xqs[t, g * 2 + half] = isum
            xd[t, g] = d


@njit(cache=True, inline="always")
def _q_0(xw, xd, xqs, q, d, t, nibbles):
    """Q4_0 (nibbles: 4 words per block, u = q + 8), or Q8_0 (8 words of bytes, u = q + 128)."""
    words = 4 if nibbles else 8
    off = 8 if nibbles else 128
    acc = fzero()
    for b in range(d.size // LANES):
        isum = izero()
        for p in range(words):
            w = load_words(q, (b * words + p) * 64)
            if nibbles:
                isum = dpbusd(isum, bits(w, 0, M4), xw[t, b * 8 + p])
                isum = dpbusd(isum, bits(w, 4, M4), xw[t, b * 8 + 4 + p])
            else:
                isum = dpbusd(isum, w, xw[t, b * 8 + p])
        v = sub(to_floats(isum), f32(off * (xqs[t, 2 * b] + xqs[t, 2 * b + 1])))  # sum u x - off sum x
        acc = fma(load_floats(d, b * LANES), mul(v, xd[t, b]), acc)
    return acc


@njit(cache=True, inline="always")
def _k4(xw, xd, xqs, q, s, d, t, five_bits):
    """Q4_K, or Q5_K with its 8 words of fifth bits after the nibbles."""
    words = 40 if five_bits else 32
    acc = fzero()
    for b in range(d.size // (2 * LANES)):
        scaled = fzero()
        mins = fzero()
        for c in range(4):
            even = izero()
            odd = izero()
            for p in range(8):
                w = load_words(q, (b * words + c * 8 + p) * 64)
                lo = bits(w, 0, M4)
                hi = bits(w, 4, M4)
                if five_bits:
                    h = load_words(q, (b * words + 32 + p) * 64)
                    lo = bor(lo, bits(h, 2 * c - 4, 0x10101010))
                    hi = bor(hi, bits(h, 2 * c - 3, 0x10101010))
                even = dpbusd(even, lo, xw[t, b * 64 + c * 16 + p])
                odd = dpbusd(odd, hi, xw[t, b * 64 + c * 16 + 8 + p])
            g = b * 8 + 2 * c
            at = b * 256 + 2 * c * LANES
            scaled = fma(mul(to_floats(even), xd[t, g]), load_u8_floats(s, at), scaled)
            scaled = fma(mul(to_floats(odd), xd[t, g + 1]), load_u8_floats(s, at + LANES), scaled)
            mins = fma(load_u8_floats(s, at + 128), xd[t, g] * f32(xqs[t, 2 * g] + xqs[t, 2 * g + 1]), mins)
            mins = fma(load_u8_floats(s, at + 128 + LANES), xd[t, g + 1] * f32(xqs[t, 2 * g + 2] + xqs[t, 2 * g + 3]),
                       mins)
        acc = fma(load_floats(d, b * 32), scaled, acc)
        acc = sub(acc, mul(load_floats(d, b * 32 + LANES), mins))
    return acc


@njit(cache=True, inline="always")
def _q6_k(xw, xd, xqs, q, s, d, t):
    acc = fzero()
    for b in range(d.size // LANES):
        scaled = fzero()
        for h in range(2):
            for quarter in range(2):
                for half in range(2):
                    lo_sum = izero()
                    hi_sum = izero()
                    for i in range(4):
                        p = half * 4 + i
                        w = load_words(q, (b * 48 + h * 16 + quarter * 8 + p) * 64)
                        high = load_words(q, (b * 48 + 32 + h * 8 + p) * 64)
                        # ql's low nibble takes qh bits 2*quarter, its high nibble bits 4 + 2*quarter
                        lo = bor(bits(w, 0, M4), bits(high, 2 * quarter - 4, 0x30303030))
                        hi = bor(bits(w, 4, M4), bits(high, 2 * quarter, 0x30303030))
                        at = b * 64 + h * 32 + quarter * 8 + p
                        lo_sum = dpbusd(lo_sum, lo, xw[t, at])
                        hi_sum = dpbusd(hi_sum, hi, xw[t, at + 16])
                    g = h * 8 + quarter * 2 + half  # group of 16 of the low nibbles; the high ones are g + 4
                    x32 = b * 8 + h * 4 + quarter
                    v = sub(to_floats(lo_sum), f32(32 * xqs[t, b * 16 + g]))
                    scaled = fma(mul(v, xd[t, x32]), load_i8_floats(s, (b * 16 + g) * LANES), scaled)
                    v = sub(to_floats(hi_sum), f32(32 * xqs[t, b * 16 + g + 4]))
                    scaled = fma(mul(v, xd[t, x32 + 2]), load_i8_floats(s, (b * 16 + g + 4) * LANES), scaled)
        acc = fma(load_floats(d, b * LANES), scaled, acc)
    return acc


@njit(cache=True, inline="always")
def _tile(kind, xw, xd, xqs, q, s, d, t):
    """One tile's 16 outputs for token t; kind: 0 Q4_0, 1 Q8_0, 2 Q4_K, 3 Q5_K, 4 Q6_K."""
    if kind == 0:
        return _q_0(xw, xd, xqs, q, d, t, True)
    if kind == 1:
        return _q_0(xw, xd, xqs, q, d, t, False)
    if kind == 2:
        return _k4(xw, xd, xqs, q, s, d, t, False)
    if kind == 3:
        return _k4(xw, xd, xqs, q, s, d, t, True)
    return _q6_k(xw, xd, xqs, q, s, d, t)


@njit(cache=True, inline="always")
def _q8_group(acc, isum, db, xd, xqs, t, b):
    """acc plus block b of token t (as `_q_0` adds it, the same operations in the same order)."""
    v = sub(to_floats(isum), f32(128 * (xqs[t, 2 * b] + xqs[t, 2 * b + 1])))
    return fma(db, mul(v, xd[t, b]), acc)


@njit(cache=True, inline="always")
def _q8_tokens(xw, xd, xqs, q, d, t0, t1, t2, t3):
    """A Q8_0 tile's 16 outputs for tokens t0..t3, each with `_q_0`'s bits: every word of the tile is loaded once
    for the 4 tokens (prefill's rows: the loads, not the products, were half the work per token)."""
    a0, a1, a2, a3 = fzero(), fzero(), fzero(), fzero()
    for b in range(d.size // LANES):
        i0, i1, i2, i3 = izero(), izero(), izero(), izero()
        for p in range(8):
            w = load_words(q, (b * 8 + p) * 64)
            i0 = dpbusd(i0, w, xw[t0, b * 8 + p])
            i1 = dpbusd(i1, w, xw[t1, b * 8 + p])
            i2 = dpbusd(i2, w, xw[t2, b * 8 + p])
            i3 = dpbusd(i3, w, xw[t3, b * 8 + p])
        db = load_floats(d, b * LANES)
        a0 = _q8_group(a0, i0, db, xd, xqs, t0, b)
        a1 = _q8_group(a1, i1, db, xd, xqs, t1, b)
        a2 = _q8_group(a2, i2, db, xd, xqs, t2, b)
        a3 = _q8_group(a3, i3, db, xd, xqs, t3, b)
    return a0, a1, a2, a3


@njit(cache=True, inline="always")
def _quantized(x):
    n, k_dim = x.shape
    xq = np.empty((n, k_dim), dtype=np.int8)
    xd = np.empty((n, k_dim // 32), dtype=np.float32)
    xqs = np.empty((n, k_dim // 16), dtype=np.int32)
    quantize(x, xq, xd, xqs)
    return xq.view(np.int32), xd, xqs


@njit(parallel=True, cache=True)
def gemv(kind: int, x: np.ndarray, q: np.ndarray, s: np.ndarray, d: np.ndarray, experts: np.ndarray,
         y: np.ndarray) -> None:
    """y[g, n, tiles * 16] = x[n, K] @ W_{experts[g]}.T for stacked weights q [E, tiles, ...], s, d (one kind)."""
    xw, xd, xqs = _quantized(x)
    n_tiles, n = q.shape[1], x.shape[0]
    for task in prange(experts.size * n_tiles):
        g, tile = task // n_tiles, task % n_tiles
        e = experts[g]
        if kind == 1 and n >= 4:  # Q8_0 prefill: 4 tokens per pass (past n the last again, stored over itself)
            for t in range(0, n, 4):
                t1, t2, t3 = min(t + 1, n - 1), min(t + 2, n - 1), min(t + 3, n - 1)
                a0, a1, a2, a3 = _q8_tokens(xw, xd, xqs, q[e, tile], d[e, tile], t, t1, t2, t3)
                store_floats(y[g, t], tile * LANES, a0)
                store_floats(y[g, t1], tile * LANES, a1)
                store_floats(y[g, t2], tile * LANES, a2)
                store_floats(y[g, t3], tile * LANES, a3)
            continue
        for t in range(n):
            store_floats(y[g, t], tile * LANES, _tile(kind, xw, xd, xqs, q[e, tile], s[e, tile], d[e, tile], t))


@njit(parallel=True, cache=True)
def ffn(kinds: np.ndarray, x: np.ndarray, inter: int, gq, gs, gd, uq, us, ud, dq, ds, dd, experts: np.ndarray,
        y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """y[g, n, tiles * 16] = down(silu(gate(x)) * up(x)) of expert experts[g], for stacked gate/up/down weights of
    the given kinds (inter: the rows of gate and up). x is quantized once, each expert's hidden state once.
    w f32 [n, G] (empty: skipped) -> out f32 [n, D] = sum_g w[:, g] * y[g] (`combine.py`)."""
    xw, xd, xqs = _quantized(x)
    n, n_experts, n_inter, n_out = x.shape[0], experts.size, gq.shape[1], dq.shape[1]
    h = np.empty((n_experts, n, n_inter * LANES), dtype=np.float32)
    up = np.empty((n_experts, n, n_inter * LANES), dtype=np.float32)
    for task in prange(n_experts * n_inter):
        g, tile = task // n_inter, task % n_inter
        e = experts[g]
        for t in range(n):
            store_floats(h[g, t], tile * LANES,
                         _tile(kinds[0], xw, xd, xqs, gq[e, tile], gs[e, tile], gd[e, tile], t))
            store_floats(up[g, t], tile * LANES,
                         _tile(kinds[1], xw, xd, xqs, uq[e, tile], us[e, tile], ud[e, tile], t))
            for i in range(tile * LANES, (tile + 1) * LANES):
                v = h[g, t, i]
                h[g, t, i] = v / (f32(1.0) + np.exp(-v)) * up[g, t, i]  # silu(gate) * up
    hq = np.empty((n_experts, n, inter), dtype=np.int8)
    hd = np.empty((n_experts, n, inter // 32), dtype=np.float32)
    hqs = np.empty((n_experts, n, inter // 16), dtype=np.int32)
    for g in prange(n_experts):
        quantize(h[g, :, :inter], hq[g], hd[g], hqs[g])
    hw = hq.view(np.int32)
    for task in prange(n_experts * n_out):
        g, tile = task // n_out, task % n_out
        e = experts[g]
        for t in range(n):
            store_floats(y[g, t], tile * LANES,
                         _tile(kinds[2], hw[g], hd[g], hqs[g], dq[e, tile], ds[e, tile], dd[e, tile], t))
    if w.size:
        weighted_sum(y, w, out)
