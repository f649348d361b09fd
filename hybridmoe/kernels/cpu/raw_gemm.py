"""Prefill with 8-bit activations over the GGUF byte layout: each expert on its own tokens, a layer's experts in one
call, every weight row read once for all of its expert's tokens.

The decode kernels (`raw_int8.py`) take one row's 64 consecutive bytes per vector and sum the lanes once per row;
with many tokens their per-token work (a float conversion and scale per 64 bytes) costs more than the weights'
reads. Here 16 rows at a time are gathered into the lane-interleaved tile of `int8.py` (one lane per row; a masked
gather per 4 bytes of the 16 rows, into a per-task copy of 16-48 KB that stays in L1/L2), and `int8.py`'s tile
arithmetic runs on it for every token: integer sums over a whole group before any float work. For Q8_0, Q4_K and
Q6_K; other types, and experts with fewer than MIN_TILE_TOKENS tokens, take the decode kernels' multi-token pass.
Either way x is rounded as the decode kernels round it, so the result is rounded(x) @ W.T, summed in another order.

At 128 tokens over 128 experts an expert has ~8 tokens, so the gathering costs as much as the arithmetic: runs of 64
bytes of the 16 rows are transposed in registers (`simd.transpose_rows`: 16 loads and 64 shuffles for 16 words,
against 32 gather instructions), and Q4_K tiles keep their scales as floats with d and dmin multiplied in, taking 4
tokens per pass over the tile (`_k4_tokens`), so the nibbles are unpacked and the scales read once per 4 tokens.
Each thread allocates its scratch once per call.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .int8 import _tile
from .raw_int8 import _buffers, _dots, prepare
from .simd import bits, bor, bxor, dpbusd, fma, fzero, gather_halves, gather_words, half_floats, izero, load_floats, \
    load_words, mul, store_bytes, store_floats, store_words, to_floats, transpose_rows

f32 = np.float32
LANES = 16
M4 = 0x0F0F0F0F  # low nibble of every byte
MIN_TILE_TOKENS = 4  # below this the gathers cost more than they save


@njit(cache=True, inline="always")
def tiled(kind):
    """Whether kind (raw_int8.KIND) has a tile form here: Q8_0, Q4_K, Q6_K."""
    return kind == 1 or kind == 2 or kind == 4


@njit(cache=True, inline="always")
def _block(kind):
    """(bytes per block, positions per block, bytes of the tile's quants per block, d values per block; for Q4_K the
    floats of `_gather_k4`)."""
    if kind == 1:
        return 34, 32, 512, LANES
    if kind == 2:
        return 144, 256, 2048, 16 * LANES
    return 210, 256, 3072, LANES


@njit(cache=True, inline="always")
def _gather_tile(kind, w, row, valid, row_bytes, b0, nbc, q, s, d):
    """Blocks b0..b0 + nbc of the 16 rows from flat row `row` of w (rows `valid` and on repeat the last) into one
    tile of `int8.py`'s layout for that kind: q, s, d as `repack.py` makes them for activations="int8"."""
    size = _block(kind)[0]
    for b in range(nbc):
        o = row * row_bytes + (b0 + b) * size
        if kind == 1:  # d, then 32 quants stored + 128
            store_floats(d, b * LANES, gather_halves(w, o, row_bytes, valid))
            for p in range(8):
                store_words(q, (b * 8 + p) * 64, bxor(gather_words(w, o + 2 + 4 * p, row_bytes, valid), 0x80808080))
        elif kind == 2:  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            store_floats(d, b * 32, gather_halves(w, o, row_bytes, valid))
            store_floats(d, b * 32 + LANES, gather_halves(w, o + 2, row_bytes, valid))
            u0 = gather_words(w, o + 4, row_bytes, valid)
            u1 = gather_words(w, o + 8, row_bytes, valid)
            u2 = gather_words(w, o + 12, row_bytes, valid)
            for g in range(4):  # scales then mins of groups g and 4 + g (the high ones' top bits from u0, u1)
                store_bytes(s, b * 256 + g * LANES, bits(u0, 8 * g, 63))
                store_bytes(s, b * 256 + (8 + g) * LANES, bits(u1, 8 * g, 63))
                store_bytes(s, b * 256 + (4 + g) * LANES, bor(bits(u2, 8 * g, 15), bits(u0, 8 * g + 2, 0x30)))
                store_bytes(s, b * 256 + (12 + g) * LANES, bor(bits(u2, 8 * g + 4, 15), bits(u1, 8 * g + 2, 0x30)))
            for p in range(32):
                store_words(q, (b * 32 + p) * 64, gather_words(w, o + 16 + 4 * p, row_bytes, valid))
        else:  # Q6_K: 128 bytes of low bits, 64 of high bits, 16 int8 scales, d
            store_floats(d, b * LANES, gather_halves(w, o + 208, row_bytes, valid))
            for k in range(3):  # ql, then qh: 192 bytes, 48 words
                transpose_rows(w, o + 64 * k, row_bytes, valid, q, (b * 48 + 16 * k) * 64)
            for k in range(4):
                u = gather_words(w, o + 192 + 4 * k, row_bytes, valid)
                for j in range(4):
                    store_bytes(s, b * 256 + (4 * k + j) * LANES, bits(u, 8 * j, 255))


@njit(cache=True, inline="always")
def _gather_k4(w, row, valid, row_bytes, nb, q, f):
    """nb Q4_K blocks of the 16 rows from flat row `row` of w: q as `_gather_tile` makes it; f per block the 8
    groups' scales times d, then their mins times dmin, 16 lanes each (the tokens' passes do no scale arithmetic)."""
    for b in range(nb):
        o = row * row_bytes + b * 144
        head = gather_words(w, o, row_bytes, valid)  # d, dmin
        d, dmin = half_floats(head, 0), half_floats(head, 1)
        u0 = gather_words(w, o + 4, row_bytes, valid)
        u1 = gather_words(w, o + 8, row_bytes, valid)
        u2 = gather_words(w, o + 12, row_bytes, valid)
        at = b * 256
        for g in range(4):  # groups g and 4 + g (the high ones' top bits from u0, u1)
            store_floats(f, at + g * LANES, mul(to_floats(bits(u0, 8 * g, 63)), d))
            store_floats(f, at + (4 + g) * LANES, mul(to_floats(bor(bits(u2, 8 * g, 15), bits(u0, 8 * g + 2, 0x30))),
                                                      d))
            store_floats(f, at + 128 + g * LANES, mul(to_floats(bits(u1, 8 * g, 63)), dmin))
            store_floats(f, at + 128 + (4 + g) * LANES,
                         mul(to_floats(bor(bits(u2, 8 * g + 4, 15), bits(u1, 8 * g + 2, 0x30))), dmin))
        transpose_rows(w, o + 16, row_bytes, valid, q, b * 2048)
        transpose_rows(w, o + 80, row_bytes, valid, q, b * 2048 + 1024)


@njit(cache=True, inline="always")
def _k4_group(acc, even, odd, se, so, me, mo, xd, xqs, t, g):
    """acc plus groups g, g + 1 of token t: their integer sums times scale * d * xd, less min * dmin * xd * sum x."""
    acc = fma(to_floats(even), mul(se, xd[t, g]), acc)
    acc = fma(to_floats(odd), mul(so, xd[t, g + 1]), acc)
    acc = fma(me, -(xd[t, g] * f32(xqs[t, 2 * g] + xqs[t, 2 * g + 1])), acc)
    return fma(mo, -(xd[t, g + 1] * f32(xqs[t, 2 * g + 2] + xqs[t, 2 * g + 3])), acc)


@njit(cache=True, inline="always")
def _k4_tokens(xw, xd, xqs, q, f, nb, t0, t1, t2, t3, acc, at):
    """The Q4_K tile's 16 outputs for tokens t0..t3 into acc from at on (16 floats each, in that order): every word
    of the tile is loaded and unpacked once for the 4 tokens."""
    a0, a1, a2, a3 = fzero(), fzero(), fzero(), fzero()
    for b in range(nb):
        for c in range(4):
            e0, e1, e2, e3 = izero(), izero(), izero(), izero()
            o0, o1, o2, o3 = izero(), izero(), izero(), izero()
            for p in range(8):
                w = load_words(q, (b * 32 + c * 8 + p) * 64)
                lo = bits(w, 0, M4)
                hi = bits(w, 4, M4)
                i = b * 64 + c * 16 + p
                e0 = dpbusd(e0, lo, xw[t0, i])
                e1 = dpbusd(e1, lo, xw[t1, i])
                e2 = dpbusd(e2, lo, xw[t2, i])
                e3 = dpbusd(e3, lo, xw[t3, i])
                o0 = dpbusd(o0, hi, xw[t0, i + 8])
                o1 = dpbusd(o1, hi, xw[t1, i + 8])
                o2 = dpbusd(o2, hi, xw[t2, i + 8])
                o3 = dpbusd(o3, hi, xw[t3, i + 8])
            g = b * 8 + 2 * c
            k = b * 256 + 2 * c * LANES
            se, so = load_floats(f, k), load_floats(f, k + LANES)
            me, mo = load_floats(f, k + 128), load_floats(f, k + 128 + LANES)
            a0 = _k4_group(a0, e0, o0, se, so, me, mo, xd, xqs, t0, g)
            a1 = _k4_group(a1, e1, o1, se, so, me, mo, xd, xqs, t1, g)
            a2 = _k4_group(a2, e2, o2, se, so, me, mo, xd, xqs, t2, g)
            a3 = _k4_group(a3, e3, o3, se, so, me, mo, xd, xqs, t3, g)
    store_floats(acc, at, a0)
    store_floats(acc, at + LANES, a1)
    store_floats(acc, at + 2 * LANES, a2)
    store_floats(acc, at + 3 * LANES, a3)


@njit(cache=True, inline="always")
def _tile_rows(kind, w, row, valid, row_bytes, xw, xd, xqs, a, n, q, s, d, acc):
    """acc[t * 16 + lane] = flat row (row + lane) of w . token a + t, for t < n, from rounded activations (xw: the
    int32 words of the rounded x; xd, xqs as `int8.quantize` gives them); q, s, d: a tile's scratch. The same
    bits as `int8.gemv` over a repacked copy of these rows."""
    _gather_tile(kind, w, row, valid, row_bytes, 0, d.size // _block(kind)[3], q, s, d)
    for t in range(n):
        store_floats(acc, t * LANES, _tile(kind, xw, xd, xqs, q, s, d, a + t))


@njit(cache=True, inline="always")
def _prepare_all(x, need):
    """`raw_int8.prepare` of x, keeping the integer sums per 16 (xqs) the tile arithmetic takes too."""
    xq, xd, xqs, xr, xk, xneg, x16 = _buffers(x.shape[0], x.shape[1])
    prepare(x, xq, xd, xqs, xr, xk, xneg, x16, need)
    return xq.view(np.uint8), xr.view(np.uint8), xd, xk, xneg, x16, xq.view(np.int32), xqs


@njit(cache=True, inline="always")
def _project(kind, w, row, valid, row_bytes, k_dim, prepared, a, n, tile, acc, q, s, d):
    """acc[t * 16 + lane] = flat row (row + lane) of w . token a + t, for t < n: the tile form where it pays
    (`tile`; q, s, d: `_any_scratch(k_dim)`), else the decode kernels' multi-token pass
    row by row."""
    xq, xr, xd, xk, xneg, x16, xw, xqs = prepared
    if tile and kind == 2:
        nb = k_dim // 256
        _gather_k4(w, row, valid, row_bytes, nb, q, d)
        last = a + n - 1
        for j in range(0, n, 4):  # past n the last token again, into acc's 3 spare rows
            _k4_tokens(xw, xd, xqs, q, d, nb, a + j, min(a + j + 1, last), min(a + j + 2, last),
                       min(a + j + 3, last), acc, j * LANES)
        return
    if tile:
        _tile_rows(kind, w, row, valid, row_bytes, xw, xd, xqs, a, n, q[:k_dim // _block(kind)[1] * _block(kind)[2]],
                   s, d[:k_dim // _block(kind)[1] * _block(kind)[3]], acc)
        return
    out = np.empty(n, dtype=np.float32)
    sums = np.empty(n * 64 if n > 1 else 0, dtype=np.float32)
    tq, tr, td, tk, tneg, t16 = xq[a:a + n], xr[a:a + n], xd[a:a + n], xk[a:a + n], xneg[a:a + n], x16[a:a + n]
    for lane in range(valid):
        _dots(kind, w, (row + lane) * row_bytes, k_dim, tq, tr, td, tk, tneg, t16, sums, out)
        for t in range(n):
            acc[t * LANES + lane] = out[t]


@njit(cache=True, inline="always")
def _any_scratch(k_dim):
    """q, s, d large enough for a tile of any tiled kind over k_dim columns (Q8_0's q, Q4_K's s and floats)."""
    return np.empty(16 * k_dim, np.uint8), np.empty(k_dim, np.uint8), np.empty(k_dim, np.float32)


@njit(parallel=True, cache=True)
def ffn_grouped(kinds: np.ndarray, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                experts: np.ndarray, starts: np.ndarray, y: np.ndarray, parts: int) -> None:
    """Each expert on its own tokens: x f32 [T, D] holds rows starts[g]..starts[g + 1] for expert experts[g] -> y f32
    [T, D], row by row down(silu(gate(x)) * up(x)) of its expert, for stacked raw weights gate, up uint8 [E, I,
    row_bytes], down [E, D, row_bytes] of the given kinds (`raw_int8.KIND`). x and the hidden state are rounded per
    row as `raw_int8.ffn` rounds them. Tasks are (16 rows, expert), split in `parts` (the threads); an expert's results
    do not depend on the others in the call."""
    prepared = _prepare_all(x, (1 << kinds[0]) | (1 << kinds[1]))
    k_dim = x.shape[1]
    n_experts, n_inter, n_out = experts.size, gate.shape[1], down.shape[1]
    g_flat, u_flat, d_flat = gate.reshape(-1), up.reshape(-1), down.reshape(-1)
    most = 1
    for g in range(n_experts):
        most = max(most, starts[g + 1] - starts[g])
    h = np.empty((x.shape[0], n_inter), dtype=np.float32)
    # Each thread (part) takes the same share of every expert's tiles, expert by expert, so it keeps one expert's
    # activations in cache at a time and the threads' work stays even; its scratch is allocated once.
    tiles = -(-n_inter // LANES)
    per_part = -(-tiles // parts)
    for part in prange(parts):
        q, s, d = _any_scratch(k_dim)
        ga, ua = np.empty((most + 3) * LANES, np.float32), np.empty((most + 3) * LANES, np.float32)
        for g in range(n_experts):
            a, n = starts[g], starts[g + 1] - starts[g]
            for c in range(part * per_part, min(tiles, (part + 1) * per_part)):
                if n == 0:
                    break
                r0 = c * LANES
                valid = min(LANES, n_inter - r0)
                row = experts[g] * n_inter + r0
                _project(kinds[0], g_flat, row, valid, gate.shape[2], k_dim, prepared, a, n,
                         tiled(kinds[0]) and n >= MIN_TILE_TOKENS, ga, q, s, d)
                _project(kinds[1], u_flat, row, valid, up.shape[2], k_dim, prepared, a, n,
                         tiled(kinds[1]) and n >= MIN_TILE_TOKENS, ua, q, s, d)
                for t in range(n):
                    for lane in range(valid):
                        v = ga[t * LANES + lane]
                        h[a + t, r0 + lane] = v / (f32(1.0) + np.exp(-v)) * ua[t * LANES + lane]  # silu(gate) * up
    hidden = _prepare_all(h, 1 << kinds[2])
    tiles = -(-n_out // LANES)
    per_part = -(-tiles // parts)
    for part in prange(parts):
        q, s, d = _any_scratch(n_inter)
        acc = np.empty((most + 3) * LANES, np.float32)
        for g in range(n_experts):
            a, n = starts[g], starts[g + 1] - starts[g]
            for c in range(part * per_part, min(tiles, (part + 1) * per_part)):
                if n == 0:
                    break
                r0 = c * LANES
                valid = min(LANES, n_out - r0)
                _project(kinds[2], d_flat, experts[g] * n_out + r0, valid, down.shape[2], n_inter, hidden, a, n,
                         tiled(kinds[2]) and n >= MIN_TILE_TOKENS, acc, q, s, d)
                for t in range(n):
                    for lane in range(valid):
                        y[a + t, r0 + lane] = acc[t * LANES + lane]
