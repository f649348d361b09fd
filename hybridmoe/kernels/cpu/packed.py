"""Numba GEMV kernels over a SIMD-friendly repacked layout (the "pinned RAM" tier: repacking copies the weights).

Rows are grouped in tiles of `lanes` rows, and within a tile every quantized byte is stored lane-minor:
`qs[tile, block, ..., byte, lane]`, so byte j of the blocks of `lanes` consecutive rows sits in one contiguous run.
The innermost loop walks the lanes (one vector lane = one output row); the loop over 8 or 16 bytes inside it has a
constant trip count and is unrolled first, so the activations become broadcast scalars, the nibbles are unpacked in
registers and no horizontal sum is ever needed. (A longer body is not unrolled, and then nothing is vectorised.)
Scales are pre-expanded to float32 per row and block; the small 6-bit group scales of the K formats stay bytes to
keep the extra bytes per weight low (~6 %).

Group sums of the activations (`xsum`, one per group of 32) fold the offsets (- 8, - dmin * m) out of the inner loop.
Padding rows (when N is not a multiple of `lanes`) are zero, and their outputs are not written.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32
u8 = np.uint8
# No reassociation: it would merge the independent accumulators below back into one long dependency chain.
FAST = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@njit(parallel=True, fastmath=FAST, cache=True)
def gemv_q4_0(x: np.ndarray, xsum: np.ndarray, qs: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
    """qs uint8 [tiles, K/32, 16, lanes] (raw nibble bytes), d f32 [tiles, K/32, lanes]."""
    n_tiles, n_blocks, _, lanes = qs.shape
    n = y.shape[0]
    for tile in prange(n_tiles):
        acc = np.zeros((n, lanes), dtype=np.float32)
        for b in range(n_blocks):
            for t in range(n):
                offset = f32(8.0) * xsum[t, b]
                for lane in range(lanes):
                    a0 = f32(0.0)
                    a1 = f32(0.0)
                    for j in range(16):
                        q = qs[tile, b, j, lane]
                        a0 += x[t, b * 32 + j] * f32(np.int32(q & 15))
                        a1 += x[t, b * 32 + 16 + j] * f32(np.int32(q >> 4))
                    acc[t, lane] += d[tile, b, lane] * ((a0 + a1) - offset)
        _store(acc, tile, y)


@njit(parallel=True, fastmath=FAST, cache=True)
def gemv_q8_0(x: np.ndarray, xsum: np.ndarray, qs: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
    """qs int8 [tiles, K/32, 32, lanes], d f32 [tiles, K/32, lanes]; xsum is unused (no offsets)."""
    n_tiles, n_blocks, _, lanes = qs.shape
    n = y.shape[0]
    for tile in prange(n_tiles):
        acc = np.zeros((n, lanes), dtype=np.float32)
        for b in range(n_blocks):
            for t in range(n):
                for lane in range(lanes):
                    a0 = f32(0.0)
                    a1 = f32(0.0)
                    for j in range(16):
                        a0 += x[t, b * 32 + j] * f32(qs[tile, b, j, lane])
                        a1 += x[t, b * 32 + 16 + j] * f32(qs[tile, b, 16 + j, lane])
                    acc[t, lane] += d[tile, b, lane] * (a0 + a1)
        _store(acc, tile, y)


@njit(parallel=True, fastmath=FAST, cache=True)
def gemv_q4_k(x: np.ndarray, xsum: np.ndarray, qs: np.ndarray, scm: np.ndarray, dd: np.ndarray,
              y: np.ndarray) -> None:
    """qs uint8 [tiles, K/256, 128, lanes] (raw nibble bytes), scm uint8 [tiles, K/256, 2, 8, lanes] (6-bit scales
    and mins), dd f32 [tiles, K/256, 2, lanes] (d, dmin). Byte i: low nibble in group 2 (i // 32), high in the next."""
    n_tiles, n_blocks, _, lanes = qs.shape
    n = y.shape[0]
    for tile in prange(n_tiles):
        acc = np.zeros((n, lanes), dtype=np.float32)
        for b in range(n_blocks):
            for t in range(n):
                for lane in range(lanes):
                    offset = f32(0.0)
                    for g in range(8):
                        offset += f32(scm[tile, b, 1, g, lane]) * xsum[t, b * 8 + g]
                    acc[t, lane] -= dd[tile, b, 1, lane] * offset
            # 16 bytes per step: a longer unrolled body would no longer be unrolled, and then not vectorised
            for h in range(8):
                g = (h // 2) * 2
                k0 = b * 256 + g * 32 + (h % 2) * 16
                for t in range(n):
                    for lane in range(lanes):
                        a0 = f32(0.0)
                        a1 = f32(0.0)
                        for j in range(16):
                            q = qs[tile, b, h * 16 + j, lane]
                            a0 += x[t, k0 + j] * f32(np.int32(q & 15))
                            a1 += x[t, k0 + 32 + j] * f32(np.int32(q >> 4))
                        scaled = f32(scm[tile, b, 0, g, lane]) * a0 + f32(scm[tile, b, 0, g + 1, lane]) * a1
                        acc[t, lane] += dd[tile, b, 0, lane] * scaled
        _store(acc, tile, y)


@njit(parallel=True, fastmath=FAST, cache=True)
def gemv_q5_k(x: np.ndarray, xsum: np.ndarray, qs: np.ndarray, qh: np.ndarray, scm: np.ndarray, dd: np.ndarray,
              y: np.ndarray) -> None:
    """As gemv_q4_k, plus qh uint8 [tiles, K/256, 32, lanes]: bit g of qh byte j is the 5th bit of element j of
    group g."""
    n_tiles, n_blocks, _, lanes = qs.shape
    n = y.shape[0]
    for tile in prange(n_tiles):
        acc = np.zeros((n, lanes), dtype=np.float32)
        for b in range(n_blocks):
            for t in range(n):
                for lane in range(lanes):
                    offset = f32(0.0)
                    for g in range(8):
                        offset += f32(scm[tile, b, 1, g, lane]) * xsum[t, b * 8 + g]
                    acc[t, lane] -= dd[tile, b, 1, lane] * offset
            for h in range(16):
                g = (h // 4) * 2
                k0 = b * 256 + g * 32 + (h % 4) * 8
                # masks and selects keep the bit work on bytes; a variable shift would widen it to 64-bit lanes
                m0, m1 = u8(1 << g), u8(2 << g)
                for t in range(n):
                    for lane in range(lanes):
                        a0 = f32(0.0)
                        a1 = f32(0.0)
                        for j in range(8):
                            q = qs[tile, b, h * 8 + j, lane]
                            high = qh[tile, b, (h % 4) * 8 + j, lane]
                            lo = u8((q & 15) | (16 if u8(high & m0) != 0 else 0))
                            hi = u8((q >> 4) | (16 if u8(high & m1) != 0 else 0))
                            a0 += x[t, k0 + j] * f32(np.int32(lo))
                            a1 += x[t, k0 + 32 + j] * f32(np.int32(hi))
                        scaled = f32(scm[tile, b, 0, g, lane]) * a0 + f32(scm[tile, b, 0, g + 1, lane]) * a1
                        acc[t, lane] += dd[tile, b, 0, lane] * scaled
        _store(acc, tile, y)


@njit(parallel=True, fastmath=FAST, cache=True)
def gemv_q6_k(x: np.ndarray, xsum: np.ndarray, ql: np.ndarray, qh: np.ndarray, sc: np.ndarray, d: np.ndarray,
              y: np.ndarray) -> None:
    """ql uint8 [tiles, K/256, 128, lanes], qh uint8 [tiles, K/256, 64, lanes] (raw bytes), sc int8
    [tiles, K/256, 16, lanes], d f32 [tiles, K/256, lanes]; xsum holds sums over groups of 16."""
    n_tiles, n_blocks, _, lanes = ql.shape
    n = y.shape[0]
    for tile in prange(n_tiles):
        acc = np.zeros((n, lanes), dtype=np.float32)
        for b in range(n_blocks):
            for t in range(n):
                for lane in range(lanes):
                    offset = f32(0.0)
                    for g in range(16):
                        offset += f32(sc[tile, b, g, lane]) * xsum[t, b * 16 + g]
                    acc[t, lane] -= f32(32.0) * d[tile, b, lane] * offset
            # (half, which 32 ql bytes, which 8 of them): quarters `quarter` and `quarter + 2` share ql bytes
            for step in range(16):
                half, quarter, part = step // 8, (step // 4) % 2, step % 4
                lo_at = half * 64 + quarter * 32 + part * 8
                hi_at = half * 32 + part * 8
                k0 = b * 256 + half * 128 + quarter * 32 + part * 8
                s0 = half * 8 + quarter * 2 + part // 2
                for t in range(n):
                    for lane in range(lanes):
                        a0 = f32(0.0)
                        a1 = f32(0.0)
                        for j in range(8):
                            q = ql[tile, b, lo_at + j, lane]
                            high = qh[tile, b, hi_at + j, lane]
                            # constant shifts and a select keep the bit work on bytes (see gemv_q5_k)
                            high = u8(high >> 2) if quarter else high
                            lo = u8((q & 15) | ((high & 3) << 4))
                            hi = u8((q >> 4) | (high & 48))
                            a0 += x[t, k0 + j] * f32(np.int32(lo))
                            a1 += x[t, k0 + 64 + j] * f32(np.int32(hi))
                        scaled = f32(sc[tile, b, s0, lane]) * a0 + f32(sc[tile, b, s0 + 4, lane]) * a1
                        acc[t, lane] += d[tile, b, lane] * scaled
        _store(acc, tile, y)


@njit(cache=True, inline="always")
def _store(acc: np.ndarray, tile: int, y: np.ndarray) -> None:
    lanes = acc.shape[1]
    for t in range(y.shape[0]):
        for lane in range(min(lanes, y.shape[1] - tile * lanes)):
            y[t, tile * lanes + lane] = acc[t, lane]
