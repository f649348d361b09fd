"""Grouped matrix products straight from raw GGUF blocks, for prefill: the tokens come sorted by expert (counts[g]
rows for the expert in slots[ids[g]]), and each program multiplies a tile of one expert's rows by a tile of its
weight, dequantized in registers from the slot's bytes (no bf16 copy of the weights is written). Gate and up are
fused: one launch gives silu(x @ gate.T) * (x @ up.T). Q4_K (QUANT_GEMM_TYPES); other types dequantize first.

    grouped_gemm(x [n, K], slots [S, >= nbytes], ids [G], counts, layout, part) -> [n, N]
    grouped_gate_up(x [n, D], slots, ids [G], counts, layout) -> [n, I]

counts are on the host (the caller's one host sync per layer gave them): the table of (expert, first row, end row)
tiles is built there and reaches the device in one copy. Products are float32 sums of bf16 operands, as
torch._grouped_mm's over the dequantized weights; the fused gate-up product rounds once, at its output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from . import checks
from .ffn import PARTS, SlotLayout
from .formats import rounded

QUANT_GEMM_TYPES = (T.Q4_K,)
BLOCK_M, BLOCK_N = 64, 64  # tokens x output rows per program; K goes one 256-value super-block at a time


@triton.jit
def _q4_k_tile(w, rows, kb):
    """Super-block kb of each row (rows: int64 [BN, 1] byte offsets) -> float32 [BN, 256], as the reference:
    d * sc[g] * q - dmin * m[g] for group g = i // 32 of element i (Q4_K's layout: hybridmoe/quant/kquants.py)."""
    i = tl.arange(0, 256)
    g = i // 32
    base = rows + kb * 144
    qs = tl.load(w + base + (16 + (g // 2) * 32 + i % 32)[None, :]).to(tl.int32)  # [BN, 256]
    q = tl.where((g % 2 == 0)[None, :], qs & 15, qs >> 4).to(tl.float32)
    j = (g & 3)[None, :]  # groups 4-7 take their low bits from byte 8 + g - 4, their top bits from bytes g - 4
    s0 = tl.load(w + base + 4 + j).to(tl.int32)
    s1 = tl.load(w + base + 8 + j).to(tl.int32)
    s2 = tl.load(w + base + 12 + j).to(tl.int32)
    lo = (g < 4)[None, :]
    sc = tl.where(lo, s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)).to(tl.float32)
    mn = tl.where(lo, s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)).to(tl.float32)
    d = tl.load((w + base).to(tl.pointer_type(tl.float16))).to(tl.float32)
    dmin = tl.load((w + base + 2).to(tl.pointer_type(tl.float16))).to(tl.float32)
    return (d * sc) * q - dmin * mn


@triton.jit
def _operand(v, BF16: tl.constexpr):
    """A matrix product's operand: bf16 (tensor cores), or on Triton's interpreter, whose dot mistakes bf16 for
    integers, float32 holding the same bf16-rounded values."""
    if BF16:
        return v.to(tl.bfloat16)
    else:
        return rounded(v.to(tl.float32), tl.bfloat16)


@triton.jit
def grouped_kernel(x, w, w2, y, ids, tiles, n_kb, N, row_bytes, stride_we, stride_x, stride_y,
                   FUSED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BF16: tl.constexpr):
    """Program (tile t, output block): rows [m0, m1) of x (one expert's, slot ids[g]) times rows [n0, n0 + BN) of
    its weight. FUSED: w is gate, w2 up, and the output is silu(gate) * up."""
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    g = tl.load(tiles + 3 * t)
    m0 = tl.load(tiles + 3 * t + 1)
    m1 = tl.load(tiles + 3 * t + 2)
    slot = tl.load(ids + g).to(tl.int64)
    rm = m0 + tl.arange(0, BM)
    mmask = rm < m1
    rn = n0 + tl.arange(0, BN)
    rows = (slot * stride_we + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None]  # [BN, 1]
    kk = tl.arange(0, 256)
    xrow = x + rm.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, n_kb):
        a = _operand(tl.load(xrow + (kb * 256 + kk)[None, :], mask=mmask[:, None], other=0.0), BF16)
        acc = tl.dot(a, tl.trans(_operand(_q4_k_tile(w, rows, kb), BF16)), acc)
        if FUSED:
            acc2 = tl.dot(a, tl.trans(_operand(_q4_k_tile(w2, rows, kb), BF16)), acc2)
    if FUSED:
        acc = acc * tl.sigmoid(acc) * acc2
    out = y + rm.to(tl.int64)[:, None] * stride_y + rn[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=mmask[:, None] & (rn < N)[None, :])


def tile_table(counts: list[int], bm: int = BLOCK_M) -> torch.Tensor:
    """(expert index, first row, end row) of every tile of at most bm rows, each within one expert's rows."""
    rows, start = [], 0
    for g, c in enumerate(counts):
        rows += [(g, a, min(a + bm, start + c)) for a in range(start, start + c, bm)]
        start += c
    return torch.tensor(rows, dtype=torch.int32).view(-1, 3)


def _check(x: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, counts: list[int], k_dim: int) -> torch.device:
    device = checks.device_of("slots", slots)
    if slots.dtype != torch.uint8 or slots.dim() != 2:
        raise ValueError(f"slots must be uint8 [n_slots, row bytes], got {slots.dtype} {tuple(slots.shape)}")
    checks.contiguous("slots", slots)
    if slots.data_ptr() % 16 or slots.shape[1] % 16:
        raise ValueError("slots must start at a 16-byte aligned address with rows of a multiple of 16 bytes")
    checks.slot_ids(ids, slots.shape[0], device)
    checks.device_of("x", x, device)
    checks.activations(x, k_dim, max_tokens=None)
    if len(counts) != ids.shape[0] or min(counts) < 1 or sum(counts) != x.shape[0]:
        raise ValueError(f"{len(counts)} token counts (each >= 1) summing to {sum(counts)} for {ids.shape[0]} "
                         f"experts and {x.shape[0]} rows of x")
    return device


def _launch(x, slots, ids, counts, layout: SlotLayout, parts: tuple[str, ...], out_dtype) -> torch.Tensor:
    spec = [layout.parts()[PARTS.index(p)] for p in parts]  # (offset, rows, row_bytes, type)
    for p, (_, _, _, qtype) in zip(parts, spec):
        if qtype not in QUANT_GEMM_TYPES:
            raise ValueError(f"{p} is {qtype.name}: the grouped quantized GEMM reads "
                             f"{', '.join(q.name for q in QUANT_GEMM_TYPES)}")
    k_dim = layout.inter if parts[0] == "down" else layout.hidden
    device = _check(x, slots, ids, counts, k_dim)
    if k_dim % 256:
        raise ValueError(f"K = {k_dim} is not whole 256-value super-blocks")
    n_rows, row_bytes = spec[0][1], spec[0][2]
    tiles = tile_table(counts).to(device, non_blocking=True)
    y = torch.empty(x.shape[0], n_rows, dtype=checks.out_dtype(out_dtype, torch.bfloat16), device=device)
    flat = slots.view(-1)
    w = flat[spec[0][0]:]
    w2 = flat[spec[-1][0]:]
    grid = (tiles.shape[0], triton.cdiv(n_rows, BLOCK_N))
    grouped_kernel[grid](x, w, w2, y, ids, tiles, k_dim // 256, n_rows, row_bytes, slots.shape[1], x.stride(0),
                         y.stride(0), FUSED=len(parts) == 2, BM=BLOCK_M, BN=BLOCK_N, BF16=not checks.interpreting(),
                         num_warps=4)
    return y


def grouped_gemm(x: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, counts: list[int], layout: SlotLayout,
                 part: str, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [n, K] with counts[g] rows for the expert in slots[ids[g]] (rows of at least layout.nbytes bytes), times
    each expert's `part` ("gate", "up" or "down") -> [n, N] (bf16 by default)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    return _launch(x, slots, ids, counts, layout, (part,), out_dtype)


def grouped_gate_up(x: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, counts: list[int], layout: SlotLayout,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) per expert, in one launch -> [n, I] (bf16 by default)."""
    if layout.gate_type != layout.up_type:
        raise ValueError(f"gate ({layout.gate_type.name}) and up ({layout.up_type.name}) differ: one launch each")
    return _launch(x, slots, ids, counts, layout, ("gate", "up"), out_dtype)
