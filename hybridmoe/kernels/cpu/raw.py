"""Numba kernels over weights in their GGUF byte layout (as mmap'd from the file): rows of raw blocks.

Each row is dequantized into a float32 buffer that stays in L1/L2 and then dotted with every token, so a weight byte
is read from memory once whatever the token count. Row dequantization follows the numpy references of
`hybridmoe.quant` operation for operation (no fused multiply-add), so `dequantize_rows` is bit-exact with them.

The 32-wide inner loops take their width (`W32`, always 32) as a run-time argument: with a constant trip count LLVM
unrolls them into scalar code (it cannot prove the byte loads and float stores apart), with a run-time one it
vectorises them behind an alias check. Callers pass `W32`.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from numba import njit, prange

from hybridmoe.quant.simple import IQ4_KVALUES

f32 = np.float32

# Kernel ids: one compiled kernel serves every type, switching per row.
KIND = {T.Q4_0: 0, T.Q8_0: 1, T.Q4_K: 2, T.Q5_K: 3, T.Q6_K: 4, T.Q2_K: 5, T.Q3_K: 6, T.IQ4_XS: 7, T.IQ2_XXS: 8,
        T.IQ1_S: 9}

# 2 ** (e - 25) for the f16 exponent field e: (1024 + mantissa) * _POW2[e] is the value of a normal f16.
_POW2 = (2.0 ** (np.arange(32) - 25)).astype(np.float32)
_ROWS_PER_TASK = 16
_IQ4 = IQ4_KVALUES.astype(np.float32)  # IQ4_XS's 16 non-linear levels


def _grid(cls) -> np.ndarray:
    """A lattice format's codebook from the `gguf` package: float32 [entries, 8]."""
    if cls.grid is None:
        cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(-1, 8), dtype=np.float32)


_IQ2_XXS_GRID = _grid(gguf_quants.IQ2_XXS)
_IQ2_SIGNS = np.frombuffer(gguf_quants.IQ2_XXS.ksigns, dtype=np.uint8).copy()  # 7 stored sign bits -> 8 (even parity)
_IQ1_S_GRID = _grid(gguf_quants.IQ1_S)
_IQ1_DELTA = np.float32(gguf_quants.IQ1_S.delta)
W32 = 32


@njit(cache=True, inline="always")
def half_at(b: np.ndarray, i: int) -> np.float32:
    """The little-endian f16 at bytes b[i], b[i + 1], as float32 (exact, numba has no float16)."""
    h = np.int32(b[i]) | (np.int32(b[i + 1]) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = f32(m) * f32(2.0 ** -24)
    elif e == 31:
        v = f32(np.inf) if m == 0 else f32(np.nan)
    else:
        v = f32(m | 1024) * _POW2[e]
    return -v if h & 0x8000 else v


@njit(cache=True, inline="always")
def scale_min_k4(s: np.ndarray, base: int, g: int) -> tuple[int, int]:
    """6-bit (scale, min) of group g from the 12 packed bytes at s[base:] (Q4_K / Q5_K)."""
    if g < 4:
        return np.int32(s[base + g]) & 63, np.int32(s[base + g + 4]) & 63
    lo = np.int32(s[base + g + 4])
    return (lo & 15) | ((np.int32(s[base + g - 4]) >> 6) << 4), (lo >> 4) | ((np.int32(s[base + g]) >> 6) << 4)


@njit(cache=True)
def _row_q4_0(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    for b in range(out.size // 32):
        o = b * 18
        d = half_at(w, o)
        for j in range(w32 // 2):
            q = np.int32(w[o + 2 + j])
            out[b * 32 + j] = d * f32((q & 15) - 8)
            out[b * 32 + 16 + j] = d * f32((q >> 4) - 8)


@njit(cache=True)
def _row_q8_0(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    for b in range(out.size // 32):
        o = b * 34
        d = half_at(w, o)
        for j in range(w32):
            out[b * 32 + j] = d * f32(np.int8(w[o + 2 + j]))


@njit(cache=True)
def _row_k4(w: np.ndarray, out: np.ndarray, five_bits: bool, w32: int) -> None:
    """Q4_K (144-byte blocks) or Q5_K (176-byte blocks, qh before qs)."""
    size = 176 if five_bits else 144
    for b in range(out.size // 256):
        o = b * size
        d = half_at(w, o)
        dmin = half_at(w, o + 2)
        qs = o + 48 if five_bits else o + 16
        for c in range(4):
            sc0, m0 = scale_min_k4(w, o + 4, 2 * c)
            sc1, m1 = scale_min_k4(w, o + 4, 2 * c + 1)
            d0, d1 = d * f32(sc0), d * f32(sc1)
            m0f, m1f = dmin * f32(m0), dmin * f32(m1)
            base = b * 256 + c * 64
            for j in range(w32):
                q = np.int32(w[qs + c * 32 + j])
                lo, hi = q & 15, q >> 4
                if five_bits:
                    h = np.int32(w[o + 16 + j])
                    lo |= ((h >> (2 * c)) & 1) << 4
                    hi |= ((h >> (2 * c + 1)) & 1) << 4
                out[base + j] = d0 * f32(lo) - m0f
                out[base + 32 + j] = d1 * f32(hi) - m1f


@njit(cache=True)
def _row_q6_k(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    for b in range(out.size // 256):
        o = b * 210
        d = half_at(w, o + 208)
        for h in range(2):
            ql = o + h * 64
            qh = o + 128 + h * 32
            sc = o + 192 + h * 8
            base = b * 256 + h * 128
            for g in range(2):
                d0, d1 = d * f32(np.int8(w[sc + g])), d * f32(np.int8(w[sc + g + 2]))
                d2, d3 = d * f32(np.int8(w[sc + g + 4])), d * f32(np.int8(w[sc + g + 6]))
                for i in range(w32 // 2):
                    j = g * 16 + i
                    a, c, hb = np.int32(w[ql + j]), np.int32(w[ql + 32 + j]), np.int32(w[qh + j])
                    out[base + j] = d0 * f32(((a & 15) | ((hb & 3) << 4)) - 32)
                    out[base + 32 + j] = d1 * f32(((c & 15) | (((hb >> 2) & 3) << 4)) - 32)
                    out[base + 64 + j] = d2 * f32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
                    out[base + 96 + j] = d3 * f32(((c >> 4) | ((hb >> 6) << 4)) - 32)


@njit(cache=True)
def _row_q2_k(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """84-byte blocks: 16 (scale, min) nibble pairs, 64 bytes of 2-bit quants, d, dmin. Quant byte l of half h holds
    element 128 h + 32 i + l at bits 2 i; group j (16 elements) is element // 16."""
    for b in range(out.size // 256):
        o = b * 84
        d = half_at(w, o + 80)
        dmin = half_at(w, o + 82)
        for j in range(16):
            h, i, second = j // 8, j % 8 // 2, j % 2
            sc = np.int32(w[o + j])
            dl, ml = d * f32(sc & 15), dmin * f32(sc >> 4)
            qs = o + 16 + h * 32 + second * 16
            for l in range(w32 // 2):
                out[b * 256 + j * 16 + l] = dl * f32((np.int32(w[qs + l]) >> (2 * i)) & 3) - ml


@njit(cache=True)
def _row_q3_k(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """110-byte blocks: 32 bytes of high bits (bit 4 h + i of byte l: element 128 h + 32 i + l; clear means - 4),
    64 bytes of 2-bit quants (as Q2_K), 12 bytes of 6-bit signed scales, d."""
    for b in range(out.size // 256):
        o = b * 110
        d = half_at(w, o + 108)
        for j in range(16):
            h, i, second = j // 8, j % 8 // 2, j % 2
            low4 = np.int32(w[o + 96 + j]) & 15 if j < 8 else np.int32(w[o + 88 + j]) >> 4
            high2 = (np.int32(w[o + 104 + j % 4]) >> (2 * (j // 4))) & 3
            dl = d * f32((low4 | (high2 << 4)) - 32)
            for l in range(w32 // 2):
                at = second * 16 + l
                low = (np.int32(w[o + 32 + h * 32 + at]) >> (2 * i)) & 3
                high = (np.int32(w[o + at]) >> (4 * h + i)) & 1
                out[b * 256 + j * 16 + l] = dl * f32(low - ((high ^ 1) << 2))


@njit(cache=True)
def _row_iq4_xs(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """136-byte blocks: d, 2 bytes of high scale bits, 4 bytes of low scale nibbles, 8 sub-blocks of 16 bytes whose
    low nibbles are elements 0-15 and high nibbles 16-31, each an index into the 16 levels."""
    for b in range(out.size // 256):
        o = b * 136
        d = half_at(w, o)
        high = np.int32(w[o + 2]) | (np.int32(w[o + 3]) << 8)
        for s in range(8):
            low = (np.int32(w[o + 4 + s // 2]) >> (4 * (s % 2))) & 15
            dl = d * f32((low | (((high >> (2 * s)) & 3) << 4)) - 32)
            for j in range(w32 // 2):
                q = np.int32(w[o + 8 + 16 * s + j])
                out[b * 256 + 32 * s + j] = dl * _IQ4[q & 15]
                out[b * 256 + 32 * s + 16 + j] = dl * _IQ4[q >> 4]


@njit(cache=True)
def _row_iq2_xxs(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """66-byte blocks: d, then per 32 elements 4 codebook indices (8 elements each) and a word of 4 x 7 sign bits
    and a 4-bit scale; the operations of gguf's reference, in its order."""
    for b in range(out.size // 256):
        o = b * 66
        d = half_at(w, o)
        for s in range(8):
            at = o + 2 + 8 * s
            aux = np.uint32(w[at + 4]) | (np.uint32(w[at + 5]) << 8) | (np.uint32(w[at + 6]) << 16) | \
                (np.uint32(w[at + 7]) << 24)
            db = d * (f32(0.5) + f32(aux >> 28)) * f32(0.25)
            for lane in range(4):
                signs = np.int32(_IQ2_SIGNS[(aux >> (7 * lane)) & 127])
                grid = _IQ2_XXS_GRID[np.int32(w[at + lane])]
                for j in range(8):
                    v = db * grid[j]
                    out[b * 256 + 32 * s + 8 * lane + j] = -v if (signs >> j) & 1 else v


@njit(cache=True)
def _row_iq1_s(w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """50-byte blocks: d, 32 bytes of low index bits, per 32 elements a 16-bit word of 4 x 3 high index bits, a
    3-bit scale and the sign of the offset; the operations of gguf's reference, in its order."""
    for b in range(out.size // 256):
        o = b * 50
        d = half_at(w, o)
        for s in range(8):
            h = np.int32(w[o + 34 + 2 * s]) | (np.int32(w[o + 35 + 2 * s]) << 8)
            dl = d * f32(2 * ((h >> 12) & 7) + 1)
            delta = -_IQ1_DELTA if h & 0x8000 else _IQ1_DELTA
            for lane in range(4):
                grid = _IQ1_S_GRID[np.int32(w[o + 2 + 4 * s + lane]) | (((h >> (3 * lane)) & 7) << 8)]
                for j in range(8):
                    out[b * 256 + 32 * s + 8 * lane + j] = dl * (grid[j] + delta)


@njit(cache=True)
def dequantize_row(kind: int, w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """One row of raw blocks (uint8) -> float32 `out` (its length is the row's element count)."""
    if kind == 0:
        _row_q4_0(w, out, w32)
    elif kind == 1:
        _row_q8_0(w, out, w32)
    elif kind == 2:
        _row_k4(w, out, False, w32)
    elif kind == 3:
        _row_k4(w, out, True, w32)
    elif kind == 4:
        _row_q6_k(w, out, w32)
    elif kind == 5:
        _row_q2_k(w, out, w32)
    elif kind == 6:
        _row_q3_k(w, out, w32)
    elif kind == 7:
        _row_iq4_xs(w, out, w32)
    elif kind == 8:
        _row_iq2_xxs(w, out, w32)
    else:
        _row_iq1_s(w, out, w32)


@njit(parallel=True, cache=True)
def dequantize_rows(kind: int, w: np.ndarray, out: np.ndarray, w32: int) -> None:
    """w uint8 [N, row_bytes] -> out float32 [N, K], rows spread over threads."""
    for r in prange(w.shape[0]):
        dequantize_row(kind, w[r], out[r], w32)


@njit(parallel=True, fastmath=True, cache=True)
def gemv_raw(kind: int, x: np.ndarray, w: np.ndarray, y: np.ndarray, w32: int) -> None:
    """y[n, N] = x[n, K] @ dequant(w[N, row_bytes]).T"""
    n, k_dim = x.shape
    n_rows = w.shape[0]
    for task in prange((n_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        buf = np.empty(k_dim, dtype=np.float32)
        for r in range(task * _ROWS_PER_TASK, min(n_rows, (task + 1) * _ROWS_PER_TASK)):
            dequantize_row(kind, w[r], buf, w32)
            for t in range(n):
                s = f32(0.0)
                for k in range(k_dim):
                    s += buf[k] * x[t, k]
                y[t, r] = s
