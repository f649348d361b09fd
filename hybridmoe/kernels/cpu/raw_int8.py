"""Decode kernels with 8-bit activations over the GGUF byte layout itself (the mmap tier: nothing is copied).

x is rounded to int8 per group of 32 exactly as `int8.quantize` does for the repacked kernels, so both compute
rounded(x) @ W.T; they sum in other orders, so they agree to float32 rounding, not bit for bit. A row is one dot
product along K: one vector lane holds 4 consecutive positions, `dpbusd` multiplies 64 weight bytes by 64
activation bytes, and the lanes are summed once per row (`hsum`). Per-group scales multiply the lanes' integer sums
as float vectors, lanes 0-7 and 8-15 each with their group's scale (`halves`).

Per type, what one vector covers and what the activations are prepared as (once per call, `prepare`):
    Q8_0  two blocks' 32 quant bytes (`load_halves`), flipped to unsigned (+ 128); the accumulator starts at
          -128 * the sum of each lane's 4 activations (`xneg`), so the sum is exact without a correction.
    Q4_K  64 of the 128 nibble bytes: low nibbles are groups 4h and 4h + 2, high ones 4h + 1 and 4h + 3, so the
          activations are reordered per 128 positions to match (`xr`); mins come off per group (`xk`).
    Q6_K  64 of the 128 low-bit bytes with their 2 high bits from qh (each half of qh serves 4 groups of 16), the
          offset 32 comes off per group of 16 (`x16`).
    Q2_K  all 64 quant bytes: shift 2 i gives elements 32 i.. of both halves of the block, so the activations are
          reordered to match (the second half of `xr`); scales and mins are the 16 nibble pairs, per group of 16.
    Q3_K  Q2_K's 2 low bits plus the third from the 32 hmask bytes (the same bytes serve both halves, at bits i and
          4 + i); quants are stored + 4, which comes off per group of 16; 16 signed 6-bit scales from 12 bytes.
    Q5_K  as Q4_K, with the fifth bit of each quant from the 32 qh bytes (bit g of byte l: element 32 g + l).
    IQ4_XS  64 of the 128 index bytes (4 sub-blocks of 32: low nibbles elements 0-15, high 16-31, so x is reordered
          to match), each nibble turned into its level + 128 by a byte shuffle; the 128 comes off through the
          accumulators' start (`xneg`), the 8 signed 6-bit scales per block are one per group of 32.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .combine import weighted_sum
from .int8 import quantize
from .simd import (add, bit_to, bits, bor, bxor, dpbusd, fma, fzero, halves, hsum, iq4_levels, iq4_xs_scales, izero,
                   k4_scales, load_floats, load_half, load_halves, load_i8_floats, load_nibble_floats, load_words, mul,
                   q3_scales, q6_high, quarters, spread, spread4, store_floats, to_floats)

f32 = np.float32
KIND = {T.Q8_0: 1, T.Q4_K: 2, T.Q5_K: 3, T.Q6_K: 4, T.Q2_K: 5, T.Q3_K: 6, T.IQ4_XS: 7}
M4 = 0x0F0F0F0F
M2 = 0x03030303
PAD = 64  # bytes past K in each activation row: a two-block Q8_0 load may read one block beyond the last
ROWS_PER_TASK = 16
NEG_MIN_LANES = np.array([0, 0, 0, 0, -1, -1, -1, -1] * 2, dtype=np.float32)  # the mins' lanes of k4_scales


@njit(cache=True)
def prepare(x, xq, xd, xqs, xr, xk, xneg, x16, need):
    """x f32 [n, K] -> xq int8 [n, K + PAD] (tail zero), xd f32 [n, K/32 + 16] (16 zero columns after the scales),
    xqs int32 [n, K/16] (as int8.quantize gives them); xr int8 [n, 3 K]: xq reordered for Q4_K, then for Q2_K /
    Q3_K, then for IQ4_XS; xk f32 [n, K/16]: per 256, xd of groups 0-3, xd * the group's integer sum (xm) of groups
    0-3, xd of groups 4-7, xm of groups 4-7; xneg int32 [n, K/2 + 16]: -128 * the sum of each 4 consecutive xq,
    then of each 4 of xr's IQ4_XS order; x16 f32 [n, K/8]: per 256, xd of its 16 groups of 16, then -32 * their
    integer sums. need (bit 1 << kind for each kind that will read them): only the sections those kinds read are
    filled (a decode step prepares its activations once per layer and once per expert)."""
    n, k_dim = x.shape
    quantize(x, xq[:, :k_dim], xd, xqs)
    k4, two_bit, iq4 = need & (1 << 2 | 1 << 3), need & (1 << 5 | 1 << 6), need & (1 << 7)
    for t in range(n):
        for i in range(k_dim, xq.shape[1]):
            xq[t, i] = 0
        for g in range(k_dim // 32, xd.shape[1]):
            xd[t, g] = 0.0
        if k4:
            for c in range(k_dim // 128):
                base = c * 128
                for j in range(32):
                    xr[t, base + j] = xq[t, base + j]
                    xr[t, base + 32 + j] = xq[t, base + 64 + j]
                    xr[t, base + 64 + j] = xq[t, base + 32 + j]
                    xr[t, base + 96 + j] = xq[t, base + 96 + j]
            for g in range(k_dim // 32):
                at = (g // 8) * 16 + (g % 8 // 4) * 8 + g % 4
                xk[t, at] = xd[t, g]
                xk[t, at + 4] = xd[t, g] * f32(xqs[t, 2 * g] + xqs[t, 2 * g + 1])
        if two_bit:  # per 64, 32 of the block's first half, then 32 of its second
            for c in range(k_dim // 256):
                for i in range(4):
                    for j in range(32):
                        xr[t, k_dim + c * 256 + i * 64 + j] = xq[t, c * 256 + i * 32 + j]
                        xr[t, k_dim + c * 256 + i * 64 + 32 + j] = xq[t, c * 256 + 128 + i * 32 + j]
        if iq4:  # per 128, the first 16 of each 32, then the last 16
            for c in range(k_dim // 128):
                for q in range(4):
                    for j in range(16):
                        xr[t, 2 * k_dim + c * 128 + q * 16 + j] = xq[t, c * 128 + q * 32 + j]
                        xr[t, 2 * k_dim + c * 128 + 64 + q * 16 + j] = xq[t, c * 128 + q * 32 + 16 + j]
        if need & (1 << 4) or two_bit:
            for g in range(k_dim // 32):
                for half in range(2):
                    j = (g // 8) * 32 + (g % 8) * 2 + half
                    x16[t, j] = xd[t, g]
                    x16[t, j + 16] = f32(-32 * xqs[t, 2 * g + half])
        if need & (1 << 1) or iq4:  # the natural order, then IQ4_XS's, then zeros
            for i in range(xneg.shape[1]):
                s = 0
                if 4 * i < 2 * k_dim:
                    for j in range(4):
                        s += xq[t, 4 * i + j] if 4 * i < k_dim else xr[t, k_dim + 4 * i + j]
                xneg[t, i] = -128 * s


@njit(cache=True, inline="always")
def _q8_0_pair(w, o, b, nb, xq, xneg, xd, acc):
    """acc + blocks b and b + 1 (b alone if it is the last) of the row at byte o, lane by lane."""
    two = b + 1 < nb
    o1 = o + (b + 1) * 34 if two else o + b * 34
    v = bxor(load_halves(w, o + b * 34 + 2, o1 + 2), 0x80808080)
    s = dpbusd(load_words(xneg, b * 8), v, load_words(xq, b * 32))
    f1 = load_half(w, o1) * xd[b + 1] if two else f32(0.0)
    return fma(to_floats(s), halves(load_half(w, o + b * 34) * xd[b], f1), acc)


@njit(cache=True, inline="always")
def _dot_q8_0(w, o, nb, xq, xneg, xd):
    """Row at byte o of w (nb blocks) . one token: xq, xneg, xd are that token's rows of `prepare`'s arrays."""
    a0 = fzero()
    a1 = fzero()
    for b in range(0, nb, 4):
        a0 = _q8_0_pair(w, o, b, nb, xq, xneg, xd, a0)
        if b + 2 < nb:
            a1 = _q8_0_pair(w, o, b + 2, nb, xq, xneg, xd, a1)
    return hsum(add(a0, a1))


@njit(cache=True, inline="always")
def _dot_q4_k(w, o, nb, xr, xk):
    """xk: per block, xd of groups 0-3, xm of 0-3, xd of 4-7, xm of 4-7 (the order of `k4_scales`)."""
    # four accumulators: one chain of fused multiply-adds would wait on its own latency every block
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 144
        p = mul(k4_scales(w, ob + 4), load_floats(xk, b * 16))  # scale * xd, min * xm per group
        a3 = fma(mul(p, load_floats(NEG_MIN_LANES, 0)), load_half(w, ob + 2), a3)  # - dmin * min * xm
        f = mul(p, load_half(w, ob))
        v = load_words(w, ob + 16)
        a0 = fma(to_floats(dpbusd(izero(), bits(v, 0, M4), load_words(xr, b * 256))), spread(f, 0, 2), a0)
        a1 = fma(to_floats(dpbusd(izero(), bits(v, 4, M4), load_words(xr, b * 256 + 64))), spread(f, 1, 3), a1)
        v = load_words(w, ob + 80)
        a2 = fma(to_floats(dpbusd(izero(), bits(v, 0, M4), load_words(xr, b * 256 + 128))), spread(f, 8, 10), a2)
        a3 = fma(to_floats(dpbusd(izero(), bits(v, 4, M4), load_words(xr, b * 256 + 192))), spread(f, 9, 11), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dot_q5_k(w, o, nb, xr, xk):
    """Q4_K's layout (qs 32 bytes later) plus a fifth bit per quant: bit g of qh byte l is element 32 g + l's."""
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 176
        p = mul(k4_scales(w, ob + 4), load_floats(xk, b * 16))
        a3 = fma(mul(p, load_floats(NEG_MIN_LANES, 0)), load_half(w, ob + 2), a3)
        f = mul(p, load_half(w, ob))
        qh = load_halves(w, ob + 16, ob + 16)
        v = load_words(w, ob + 48)
        a0 = fma(to_floats(dpbusd(izero(), bor(bits(v, 0, M4), bit_to(qh, 0, 2, 4)), load_words(xr, b * 256))),
                 spread(f, 0, 2), a0)
        a1 = fma(to_floats(dpbusd(izero(), bor(bits(v, 4, M4), bit_to(qh, 1, 3, 4)), load_words(xr, b * 256 + 64))),
                 spread(f, 1, 3), a1)
        v = load_words(w, ob + 112)
        a2 = fma(to_floats(dpbusd(izero(), bor(bits(v, 0, M4), bit_to(qh, 4, 6, 4)), load_words(xr, b * 256 + 128))),
                 spread(f, 8, 10), a2)
        a3 = fma(to_floats(dpbusd(izero(), bor(bits(v, 4, M4), bit_to(qh, 5, 7, 4)), load_words(xr, b * 256 + 192))),
                 spread(f, 9, 11), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dot_q6_k(w, o, nb, xq, x16):
    """x16: per group of 16, xd, then -32 * the group's integer sum (`prepare`)."""
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 210
        f = mul(mul(load_i8_floats(w, ob + 192), load_floats(x16, b * 32)), load_half(w, ob + 208))
        a0 = fma(f, load_floats(x16, b * 32 + 16), a0)  # - 32 * the sum of the group's x
        v = load_words(w, ob)
        qh = load_halves(w, ob + 128, ob + 128)
        a0 = fma(to_floats(dpbusd(izero(), bor(bits(v, 0, M4), q6_high(qh, 0)), load_words(xq, b * 256))),
                 quarters(f, 0), a0)
        a1 = fma(to_floats(dpbusd(izero(), bor(bits(v, 4, M4), q6_high(qh, 1)), load_words(xq, b * 256 + 64))),
                 quarters(f, 4), a1)
        v = load_words(w, ob + 64)
        qh = load_halves(w, ob + 160, ob + 160)
        a2 = fma(to_floats(dpbusd(izero(), bor(bits(v, 0, M4), q6_high(qh, 0)), load_words(xq, b * 256 + 128))),
                 quarters(f, 8), a2)
        a3 = fma(to_floats(dpbusd(izero(), bor(bits(v, 4, M4), q6_high(qh, 1)), load_words(xq, b * 256 + 192))),
                 quarters(f, 12), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dot_q2_k(w, o, nb, xr2, x16):
    """One 64-byte load holds both halves' 2-bit quants: shift 2 i gives elements 32 i.. of each half (groups of
    16: 2 i, 2 i + 1 in lanes 0-7, 8 + 2 i, 9 + 2 i in lanes 8-15); xr2 is x in that order."""
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 84
        xd16 = load_floats(x16, b * 32)
        f = mul(mul(load_nibble_floats(w, ob, 0), xd16), load_half(w, ob + 80))
        # - dmin * min * xd * (the group's sum): x16's second half holds -32 * the sums
        a3 = fma(mul(mul(load_nibble_floats(w, ob, 1), xd16), load_floats(x16, b * 32 + 16)),
                 load_half(w, ob + 82) * f32(1 / 32), a3)
        v = load_words(w, ob + 16)
        a0 = fma(to_floats(dpbusd(izero(), bits(v, 0, M2), load_words(xr2, b * 256))), spread4(f, 0, 1, 8, 9), a0)
        a1 = fma(to_floats(dpbusd(izero(), bits(v, 2, M2), load_words(xr2, b * 256 + 64))), spread4(f, 2, 3, 10, 11),
                 a1)
        a2 = fma(to_floats(dpbusd(izero(), bits(v, 4, M2), load_words(xr2, b * 256 + 128))),
                 spread4(f, 4, 5, 12, 13), a2)
        a3 = fma(to_floats(dpbusd(izero(), bits(v, 6, M2), load_words(xr2, b * 256 + 192))),
                 spread4(f, 6, 7, 14, 15), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dot_q3_k(w, o, nb, xr2, x16):
    """Q2_K's layout of the low 2 bits, plus a third bit from hmask; quants are stored + 4 (unsigned)."""
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 110
        f = mul(mul(q3_scales(w, ob + 96), load_floats(x16, b * 32)), load_half(w, ob + 108))
        a0 = fma(f, mul(load_floats(x16, b * 32 + 16), f32(1 / 8)), a0)  # - 4 * the sum of the group's x
        v = load_words(w, ob + 32)
        hm = load_halves(w, ob, ob)
        a0 = fma(to_floats(dpbusd(izero(), bor(bits(v, 0, M2), bit_to(hm, 0, 4, 2)), load_words(xr2, b * 256))),
                 spread4(f, 0, 1, 8, 9), a0)
        a1 = fma(to_floats(dpbusd(izero(), bor(bits(v, 2, M2), bit_to(hm, 1, 5, 2)), load_words(xr2, b * 256 + 64))),
                 spread4(f, 2, 3, 10, 11), a1)
        a2 = fma(to_floats(dpbusd(izero(), bor(bits(v, 4, M2), bit_to(hm, 2, 6, 2)), load_words(xr2, b * 256 + 128))),
                 spread4(f, 4, 5, 12, 13), a2)
        a3 = fma(to_floats(dpbusd(izero(), bor(bits(v, 6, M2), bit_to(hm, 3, 7, 2)), load_words(xr2, b * 256 + 192))),
                 spread4(f, 6, 7, 14, 15), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dot_iq4_xs(w, o, nb, xr4, xneg4, xd):
    """Two 64-byte loads per block, each 4 sub-blocks of 16 bytes (lanes 4q..4q+3: sub-block q); the nibbles become
    levels + 128 by one byte shuffle, and the accumulators start at -128 * the sums of x (`xneg`'s IQ4_XS part)."""
    a0 = fzero()
    a1 = fzero()
    a2 = fzero()
    a3 = fzero()
    for b in range(nb):
        ob = o + b * 136
        f = mul(mul(iq4_xs_scales(w, ob), load_floats(xd, b * 8)), load_half(w, ob))
        v = load_words(w, ob + 8)
        at = b * 256
        a0 = fma(to_floats(dpbusd(load_words(xneg4, at // 4), iq4_levels(bits(v, 0, M4)), load_words(xr4, at))),
                 quarters(f, 0), a0)
        a1 = fma(to_floats(dpbusd(load_words(xneg4, at // 4 + 16), iq4_levels(bits(v, 4, M4)),
                                  load_words(xr4, at + 64))), quarters(f, 0), a1)
        v = load_words(w, ob + 72)
        a2 = fma(to_floats(dpbusd(load_words(xneg4, at // 4 + 32), iq4_levels(bits(v, 0, M4)),
                                  load_words(xr4, at + 128))), quarters(f, 4), a2)
        a3 = fma(to_floats(dpbusd(load_words(xneg4, at // 4 + 48), iq4_levels(bits(v, 4, M4)),
                                  load_words(xr4, at + 192))), quarters(f, 4), a3)
    return hsum(add(add(a0, a1), add(a2, a3)))


@njit(cache=True, inline="always")
def _dots_q4_k(w, o, nb, xr, xk, acc, out):
    """_dot_q4_k for every token (rows of xr, xk), the block's scales and nibbles unpacked once for all of them;
    each token's arithmetic is _dot_q4_k's, in the same order, so results are the same bits. acc: f32 [n * 64]."""
    n = out.size
    acc[:n * 64] = 0.0
    neg = load_floats(NEG_MIN_LANES, 0)
    for b in range(nb):
        ob = o + b * 144
        scales = k4_scales(w, ob + 4)
        d = load_half(w, ob)
        dmin = load_half(w, ob + 2)
        v = load_words(w, ob + 16)
        lo0, hi0 = bits(v, 0, M4), bits(v, 4, M4)
        v = load_words(w, ob + 80)
        lo1, hi1 = bits(v, 0, M4), bits(v, 4, M4)
        for t in range(n):
            at = t * 64
            p = mul(scales, load_floats(xk[t], b * 16))
            a3 = fma(mul(p, neg), dmin, load_floats(acc, at + 48))
            f = mul(p, d)
            x = xr[t]
            store_floats(acc, at, fma(to_floats(dpbusd(izero(), lo0, load_words(x, b * 256))), spread(f, 0, 2),
                                      load_floats(acc, at)))
            store_floats(acc, at + 16, fma(to_floats(dpbusd(izero(), hi0, load_words(x, b * 256 + 64))),
                                           spread(f, 1, 3), load_floats(acc, at + 16)))
            store_floats(acc, at + 32, fma(to_floats(dpbusd(izero(), lo1, load_words(x, b * 256 + 128))),
                                           spread(f, 8, 10), load_floats(acc, at + 32)))
            store_floats(acc, at + 48, fma(to_floats(dpbusd(izero(), hi1, load_words(x, b * 256 + 192))),
                                           spread(f, 9, 11), a3))
    for t in range(n):
        at = t * 64
        out[t] = hsum(add(add(load_floats(acc, at), load_floats(acc, at + 16)),
                          add(load_floats(acc, at + 32), load_floats(acc, at + 48))))


@njit(cache=True, inline="always")
def _dots(kind, w, o, k_dim, xq, xr, xd, xk, xneg, x16, acc, out):
    """_dot of one row for every token (rows of the prepared arrays) -> out [n]."""
    if kind == 2 and out.size > 1:
        _dots_q4_k(w, o, k_dim // 256, xr, xk, acc, out)
        return
    for t in range(out.size):
        out[t] = _dot(kind, w, o, k_dim, xq[t], xr[t], xd[t], xk[t], xneg[t], x16[t])


@njit(cache=True, inline="always")
def _dot(kind, w, o, k_dim, xq, xr, xd, xk, xneg, x16):
    if kind == 1:
        return _dot_q8_0(w, o, k_dim // 32, xq, xneg, xd)
    if kind == 2:
        return _dot_q4_k(w, o, k_dim // 256, xr, xk)
    if kind == 3:
        return _dot_q5_k(w, o, k_dim // 256, xr, xk)
    if kind == 4:
        return _dot_q6_k(w, o, k_dim // 256, xq, x16)
    if kind == 5:
        return _dot_q2_k(w, o, k_dim // 256, xr[k_dim:], x16)
    if kind == 6:
        return _dot_q3_k(w, o, k_dim // 256, xr[k_dim:], x16)
    return _dot_iq4_xs(w, o, k_dim // 256, xr[2 * k_dim:], xneg[k_dim // 4:], xd)


@njit(cache=True, inline="always")
def _buffers(n, k_dim):
    """Empty arrays for `prepare` of n rows of K."""
    return (np.empty((n, k_dim + PAD), dtype=np.int8), np.empty((n, k_dim // 32 + 16), dtype=np.float32),
            np.empty((n, k_dim // 16), dtype=np.int32), np.empty((n, 3 * k_dim), dtype=np.int8),
            np.empty((n, k_dim // 16), dtype=np.float32), np.empty((n, k_dim // 2 + 16), dtype=np.int32),
            np.empty((n, k_dim // 8), dtype=np.float32))


@njit(cache=True, inline="always")
def _first(xq, xr, xd, xk, xneg, x16):
    """The first token's rows of `prepare`'s arrays (made but never read where x has no rows). A decode kernel
    takes them once: views made per row (a reference count up and down each) cost a third of the experts' time."""
    return xq[0], xr[0], xd[0], xk[0], xneg[0], x16[0]


@njit(cache=True, inline="always")
def _prepared(x, need):
    xq, xd, xqs, xr, xk, xneg, x16 = _buffers(x.shape[0], x.shape[1])
    prepare(x, xq, xd, xqs, xr, xk, xneg, x16, need)
    return xq.view(np.uint8), xr.view(np.uint8), xd, xk, xneg, x16


@njit(parallel=True, cache=True)
def gemv(kind: int, x: np.ndarray, w: np.ndarray, experts: np.ndarray, y: np.ndarray) -> None:
    """y[g, n, N] = x[n, K] @ W_{experts[g]}.T for stacked raw weights w uint8 [E, N, row_bytes] of one kind."""
    xq, xr, xd, xk, xneg, x16 = _prepared(x, 1 << kind)
    n, k_dim = x.shape
    n_rows = w.shape[1]
    flat = w.reshape(-1)
    row_bytes = w.shape[2]
    chunks = -(-n_rows // ROWS_PER_TASK)
    q0, r0, d0, k0, neg0, s0 = _first(xq, xr, xd, xk, xneg, x16)
    for task in prange(experts.size * chunks):
        g, c = task // chunks, task % chunks
        base = experts[g] * n_rows
        acc = np.empty(n * 64 if n > 1 else 0, dtype=np.float32)
        for r in range(c * ROWS_PER_TASK, min(n_rows, (c + 1) * ROWS_PER_TASK)):
            if n == 1:  # decode: no views made, nothing allocated per row
                y[g, 0, r] = _dot(kind, flat, (base + r) * row_bytes, k_dim, q0, r0, d0, k0, neg0, s0)
            else:
                _dots(kind, flat, (base + r) * row_bytes, k_dim, xq, xr, xd, xk, xneg, x16, acc, y[g, :, r])


@njit(parallel=True, cache=True)
def ffn(kinds: np.ndarray, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, experts: np.ndarray,
        y: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """y[g, n, D] = down(silu(gate(x)) * up(x)) of expert experts[g], for stacked raw weights gate, up uint8
    [E, I, row_bytes] and down [E, D, row_bytes] of the given kinds. x is rounded once, each expert's hidden state
    once (as `int8.ffn` rounds them). w f32 [n, G] (empty: skipped) -> out f32 [n, D] = sum_g w[:, g] * y[g]."""
    xq, xr, xd, xk, xneg, x16 = _prepared(x, (1 << kinds[0]) | (1 << kinds[1]))
    n, k_dim = x.shape
    n_experts, n_inter, n_out = experts.size, gate.shape[1], down.shape[1]
    g_flat, u_flat, d_flat = gate.reshape(-1), up.reshape(-1), down.reshape(-1)
    h = np.empty((n_experts, n, n_inter), dtype=np.float32)
    chunks = -(-n_inter // ROWS_PER_TASK)
    q0, r0, d0, k0, neg0, s0 = _first(xq, xr, xd, xk, xneg, x16)
    for task in prange(n_experts * chunks):
        g, c = task // chunks, task % chunks
        base = experts[g] * n_inter
        acc = np.empty(n * 64 if n > 1 else 0, dtype=np.float32)
        v = np.empty(n if n > 1 else 0, dtype=np.float32)
        u = np.empty(n if n > 1 else 0, dtype=np.float32)
        for r in range(c * ROWS_PER_TASK, min(n_inter, (c + 1) * ROWS_PER_TASK)):
            if n == 1:  # decode: no views made, nothing allocated per row
                a = _dot(kinds[0], g_flat, (base + r) * gate.shape[2], k_dim, q0, r0, d0, k0, neg0, s0)
                b = _dot(kinds[1], u_flat, (base + r) * up.shape[2], k_dim, q0, r0, d0, k0, neg0, s0)
                h[g, 0, r] = a / (f32(1.0) + np.exp(-a)) * b  # silu(gate) * up
                continue
            _dots(kinds[0], g_flat, (base + r) * gate.shape[2], k_dim, xq, xr, xd, xk, xneg, x16, acc, v)
            _dots(kinds[1], u_flat, (base + r) * up.shape[2], k_dim, xq, xr, xd, xk, xneg, x16, acc, u)
            for t in range(n):
                h[g, t, r] = v[t] / (f32(1.0) + np.exp(-v[t])) * u[t]
    hq, hd, hqs, hr, hk, hneg, h16 = _buffers(n_experts * n, n_inter)
    for g in range(n_experts):  # a few KB each: not worth a parallel region
        rows = slice(g * n, (g + 1) * n)
        prepare(h[g], hq[rows], hd[rows], hqs[rows], hr[rows], hk[rows], hneg[rows], h16[rows], 1 << kinds[2])
    hq, hr = hq.view(np.uint8), hr.view(np.uint8)
    chunks = -(-n_out // ROWS_PER_TASK)
    for task in prange(n_experts * chunks):
        g, c = task // chunks, task % chunks
        base = experts[g] * n_out
        acc = np.empty(n * 64 if n > 1 else 0, dtype=np.float32)
        # this expert's rows of the prepared hidden state, as views made once per task
        rows = slice(g * n, (g + 1) * n)
        gq, gr, gd, gk, gneg, g16 = hq[rows], hr[rows], hd[rows], hk[rows], hneg[rows], h16[rows]
        q0, r0, d0, k0, neg0, s0 = _first(gq, gr, gd, gk, gneg, g16)
        for r in range(c * ROWS_PER_TASK, min(n_out, (c + 1) * ROWS_PER_TASK)):
            if n == 1:
                y[g, 0, r] = _dot(kinds[2], d_flat, (base + r) * down.shape[2], n_inter, q0, r0, d0, k0, neg0, s0)
            else:
                _dots(kinds[2], d_flat, (base + r) * down.shape[2], n_inter, gq, gr, gd, gk, gneg, g16, acc,
                      y[g, :, r])
    if w.size:
        weighted_sum(y, w, out)

