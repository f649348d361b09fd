"""Dequantization of raw GGUF rows to a float tensor on the GPU, for prefill (then a torch matmul)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import BLOCK_SIZE, LAYOUT, TYPE_SIZE, decode, load, slot_of


@triton.jit
def _value(q, s, m, k: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr):
    v = s * (((q >> (8 * k)) & 255) - OFF).to(tl.float32)  # the reference's d * q: one rounding
    if HAS_MIN:
        v = v - m
    return v


@triton.jit
def _store_part(out, orow, rmask, q, s, m, o, WB: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr):
    """The WB values of each word, joined into a last axis so that each thread stores them with one vector."""
    if WB == 2:
        v = tl.join(_value(q, s, m, 0, OFF, HAS_MIN), _value(q, s, m, 1, OFF, HAS_MIN))
    else:  # join(join(v0, v2), join(v1, v3))[..., j, i] = v[2 j + i]
        v = tl.join(tl.join(_value(q, s, m, 0, OFF, HAS_MIN), _value(q, s, m, 2, OFF, HAS_MIN)),
                    tl.join(_value(q, s, m, 1, OFF, HAS_MIN), _value(q, s, m, 3, OFF, HAS_MIN)))
        v = tl.reshape(v, [v.shape[0], v.shape[1], v.shape[2], 4])
    k = tl.arange(0, WB)[None, None, None, :]
    tl.store(out + orow + o[:, :, :, None] + k, v.to(out.dtype.element_ty), mask=rmask)


@triton.jit
def dequant_kernel(w, out, ids, N, row_units, stride_or, stride_we, stride_oe, QT: tl.constexpr, R: tl.constexpr,
                   BB: tl.constexpr, NA: tl.constexpr, WB: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr,
                   ROW_ALIGN: tl.constexpr, HAS_IDS: tl.constexpr):
    """Program (row tile, block tile, matrix g): R rows x BB blocks of matrix g -> out[g, rows, elements of those
    blocks]. Matrix g is w + slot * stride_we with slot = ids[g] if HAS_IDS else g; out[g] is out + g * stride_oe."""
    g = tl.program_id(2)
    w = w + slot_of(ids, g, HAS_IDS) * stride_we
    out = out + g.to(tl.int64) * stride_oe
    r = tl.program_id(0) * R + tl.arange(0, R)
    kb = tl.program_id(1) * BB
    rows = tl.minimum(r, N - 1).to(tl.int64) * (row_units * ROW_ALIGN)  # rows past N repeat the last one
    qa, sa, ma, oa, qb, sb, mb, ob = decode(QT, load(QT, w, rows, kb, BB, NA), kb, BB, NA)
    orow = (r.to(tl.int64) * stride_or)[None, :, None, None]
    rmask = (r < N)[None, :, None, None]
    _store_part(out, orow, rmask, qa, sa, ma, oa, WB, OFF, HAS_MIN)
    _store_part(out, orow, rmask, qb, sb, mb, ob, WB, OFF, HAS_MIN)


def launch(w: torch.Tensor, out: torch.Tensor, qtype: int, *, row_bytes: int | None = None, stride_we: int = 0,
           ids: torch.Tensor | None = None) -> None:
    """Launch over already checked tensors: w uint8 [N, row_bytes] -> out [N, K] float32 / bfloat16 / float16.

    Grouped: out [G, N, K] contiguous, and matrix g starts at byte ids[g] * stride_we of w (a flat uint8 view at
    the first matrix's first row, whose rows are row_bytes apart), or g * stride_we without ids.
    """
    _, wb, _, off, has_min = LAYOUT[qtype]
    n_mats = out.shape[0] if out.dim() == 3 else 1
    n_rows = out.shape[-2]
    row_bytes = w.shape[1] if row_bytes is None else row_bytes
    nb = row_bytes // TYPE_SIZE[qtype]
    row_align = 16 if row_bytes % 16 == 0 else 2
    BB = 1
    while nb % (2 * BB) == 0 and 2 * BB * BLOCK_SIZE[qtype] <= 1024:  # ~1024 values per row and program
        BB *= 2
    R = 4 if out.device.type == "cuda" else 64  # the interpreter runs programs one by one: fewer is faster
    grid = (triton.cdiv(n_rows, R), nb // BB, n_mats)
    # No FMA contraction: s * q - m rounds twice, as the numpy reference does, so float32 output is bit-exact.
    dequant_kernel[grid](w, out, w if ids is None else ids, n_rows, row_bytes // row_align, out.stride(-2),
                         stride_we, out.stride(0) if out.dim() == 3 else 0, QT=qtype, R=R, BB=BB, NA=16 // wb, WB=wb,
                         OFF=off, HAS_MIN=has_min, ROW_ALIGN=row_align, HAS_IDS=ids is not None, num_warps=4,
                         enable_fp_fusion=False)
