"""Fused dequant-GEMV for decode: y[n, N] = x[n, K] @ W.T straight from raw GGUF rows, f32 accumulation.

One program owns R output rows of one matrix and walks their blocks BB at a time; the grid's second axis picks
the matrix (an expert), so all the experts of a layer can run in one launch. Quants stay packed four (or two)
to a register; each is moved into a float's mantissa, multiplied with x, and the scale is applied once per
word. Sums stay in a float32 accumulator of the tile's shape, reduced once at the end, so no step needs a
cross-thread reduction. Tokens are taken one at a time (decode has 1 to 8 per expert); the weights are re-read
from L2 for each.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .formats import BLOCK_SIZE, LAYOUT, TYPE_SIZE, decode, load, slot_of


@triton.jit
def _part(acc, q, s, m, o, xt, every_row, WB: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr,
          HAS_MIN: tl.constexpr):
    """acc + the dot of one part's words with x: per word, sum_k w_k x_k = s' * sum_k v_k x_k - m' * sum_k x_k.

    v = 1 + u * 2^(SH - 23) is the float whose mantissa holds u at bit SH, made with a shift and an OR straight
    from the packed word (an int-to-float conversion per element would run at a quarter of the FMA rate). Then
    w = s * (u - OFF) - m = s' * v - m' with s' = s * 2^(23 - SH) and m' = s' + s * OFF + m. v stays in [1, 2),
    so sum_k v_k x_k keeps the quants' precision.
    """
    SH: tl.constexpr = 16 if BITS <= 7 else 15  # byte-aligned where the exponent leaves room
    s2 = s * (1 << (23 - SH))
    m2 = s2 + s * OFF
    if HAS_MIN:
        m2 += m
    for k in tl.static_range(WB):
        v = ((((q >> (8 * k)) & 255) << SH) | 0x3F800000).to(tl.float32, bitcast=True)
        xk = tl.load(xt + o + k + every_row).to(tl.float32)
        if k == 0:
            t = v * xk
            xs = xk
        else:
            t += v * xk
            xs += xk
    return acc + s2 * t - m2 * xs


@triton.jit
def _tile_dot(acc, QT: tl.constexpr, raw, kb, xt, R: tl.constexpr, BB: tl.constexpr, NA: tl.constexpr,
              WB: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr):
    """acc [NA, R, J] + one loaded tile of weights against the matching x.

    x is loaded in the weights' full shape (the same values for every row): a smaller x tile would get another
    thread layout, and Triton would move the weight tile between threads to match it."""
    qa, sa, ma, oa, qb, sb, mb, ob = decode(QT, raw, kb, BB, NA)
    every_row = tl.zeros([1, R, 1], tl.int32)
    acc = _part(acc, qa, sa, ma, oa, xt, every_row, WB, BITS, OFF, HAS_MIN)
    return _part(acc, qb, sb, mb, ob, xt, every_row, WB, BITS, OFF, HAS_MIN)


@triton.jit
def gemv_kernel(x, w, w2, y, ids, N, nb, n_tok, stride_xe, stride_xt, stride_we, row_units, stride_ye, stride_yt,
                QT: tl.constexpr, R: tl.constexpr, BB: tl.constexpr, J: tl.constexpr, NA: tl.constexpr,
                WB: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr,
                ROW_ALIGN: tl.constexpr, HAS_IDS: tl.constexpr, GATED: tl.constexpr):
    """Program (row tile, matrix e). Matrix e is w + slot * stride_we, slot = ids[e] if HAS_IDS else e; a negative
    slot is skipped.

    Rows are row_units * ROW_ALIGN bytes apart (so the compiler knows their alignment). Rows past N repeat row
    N - 1 and are not stored, so no load needs a mask. GATED: w is gate and w2 up (same type and shape);
    y = silu(x @ gate.T) * (x @ up.T).
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    slot = slot_of(ids, e, HAS_IDS)
    if slot < 0:  # an expert the caller computes elsewhere (the CPU): its rows are left as they are
        return
    w = w + slot * stride_we
    w2 = w2 + slot * stride_we
    r = pid * R + tl.arange(0, R)
    rows = tl.minimum(r, N - 1).to(tl.int64) * (row_units * ROW_ALIGN)
    for t in range(n_tok):
        xt = x + e.to(tl.int64) * stride_xe + t * stride_xt
        acc = tl.zeros([NA, R, J], dtype=tl.float32)
        acc2 = tl.zeros([NA, R, J], dtype=tl.float32)
        # software pipelining by hand: the next tile's loads are in flight while this one is decoded. The last
        # step reloads the final tile (a cache hit) rather than masking.
        raw = load(QT, w, rows, 0, BB, NA)
        if GATED:
            raw2 = load(QT, w2, rows, 0, BB, NA)
        for kb in range(0, nb, BB):
            nxt = tl.minimum(kb + BB, nb - BB)
            raw_next = load(QT, w, rows, nxt, BB, NA)
            acc = _tile_dot(acc, QT, raw, kb, xt, R, BB, NA, WB, BITS, OFF, HAS_MIN)
            raw = raw_next
            if GATED:
                raw2_next = load(QT, w2, rows, nxt, BB, NA)
                acc2 = _tile_dot(acc2, QT, raw2, kb, xt, R, BB, NA, WB, BITS, OFF, HAS_MIN)
                raw2 = raw2_next
        out = tl.sum(tl.sum(acc, axis=2), axis=0)  # [R]
        if GATED:
            z = tl.exp(-tl.abs(out))  # sigmoid from exp(-|g|), which cannot overflow
            up = tl.sum(tl.sum(acc2, axis=2), axis=0)
            out = out * tl.where(out >= 0, 1.0 / (1.0 + z), z / (1.0 + z)) * up
        yp = y + e.to(tl.int64) * stride_ye + t * stride_yt + r
        tl.store(yp, out.to(y.dtype.element_ty), mask=r < N)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(qtype: int, n_rows: int, nb: int, n_mats: int, device: torch.device) -> dict:
    """Tile sizes for one launch: R rows, BB blocks per step (a divisor of nb), warps.

    Decode GEMVs are a few MB, so the grid must cover every SM several times over; then about 4096 quants per
    step. Measured on an H100 (bench/gpu_kernels.py --sweep, 2048x7168 and 7168x2048, Q4_K and Q8_0): the best
    tiles were within about 10% of these, most others within 30%.
    """
    want = 4 * _sm_count(device)
    R = 8 if device.type == "cuda" else 64  # the interpreter runs programs one by one: fewer is faster
    while R > 1 and triton.cdiv(n_rows, R) * n_mats < want:
        R //= 2
    BB = 1
    while nb % (2 * BB) == 0 and R * 2 * BB * BLOCK_SIZE[qtype] <= 4096:
        BB *= 2
    return {"R": R, "BB": BB, "num_warps": 2 if BLOCK_SIZE[qtype] == 256 else 4}


def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, qtype: int, *, n_rows: int, k_dim: int,
           stride_we: int, ids: torch.Tensor | None = None, w2: torch.Tensor | None = None,
           config: dict | None = None) -> None:
    """Launch over already checked tensors. x [E or 1, n, K] (stride 0 over E when shared), y [E, n, N]."""
    per_block, wb, bits, off, has_min = LAYOUT[qtype]
    n_mats, n_tok = y.shape[0], y.shape[1]
    nb = k_dim // BLOCK_SIZE[qtype]
    row_bytes = nb * TYPE_SIZE[qtype]
    row_align = 16 if row_bytes % 16 == 0 else 2
    cfg = config or pick_config(qtype, n_rows, nb, n_mats, x.device)
    R, BB = cfg["R"], cfg["BB"]
    if nb % BB:
        raise ValueError(f"BB = {BB} does not divide the {nb} blocks of a row")
    grid = (triton.cdiv(n_rows, R), n_mats)
    gemv_kernel[grid](
        x, w, w if w2 is None else w2, y, w if ids is None else ids, n_rows, nb, n_tok,
        x.stride(0), x.stride(1), stride_we, row_bytes // row_align, y.stride(0), y.stride(1),
        QT=qtype, R=R, BB=BB, J=BB * per_block, NA=16 // wb, WB=wb, BITS=bits, OFF=off, HAS_MIN=has_min,
        ROW_ALIGN=row_align, HAS_IDS=ids is not None, GATED=w2 is not None, num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3), enable_fp_fusion=True)
