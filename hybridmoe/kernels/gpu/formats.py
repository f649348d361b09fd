"""Triton unpacking of raw GGUF blocks, one function per block format, shared by the GEMV and dequant kernels.

Every format reads a tile of R rows x BB consecutive blocks. A block is cut into P pieces of 16 quant
bytes, read as NA words of WB bytes (WB = 4, or 2 for blocks of 18, 34 or 210 bytes, which start on any even
address). Each piece yields two "parts" A and B of 16 elements (Q4_K: the low and high nibbles). Per part:
    q [NA, R, J] int32    packed quants: byte k of each word is the unsigned BITS-bit quant u of element o + k
    s [NA, R, J] float32  the scale; m the min (0.0 for symmetric formats), so that
                          w = s * float(u - OFF) - m               (BITS, OFF per format in LAYOUT)
    o [NA, 1, J] int32    the element index, inside its row, of byte 0 of each word
Quants stay packed 4 (or 2) to a register: masks and shifts work on all of them at once, and the consumer moves
each one straight into a float's mantissa. All tensors of a tile have the same shape and element-wise loads, so
Triton gives them one thread layout and never moves a tile between threads; NA comes first because Triton
spreads threads over the last axes, and the words of a piece should share a thread and its scale work. s and m
are computed as `hybridmoe.quant` computes them, so dequantization with the formula above is bit-exact.

Each format is split in two: `load` issues the tile's loads and returns the raw words, `decode` does the bit work,
so that the GEMV can load the next tile before it decodes this one. Arguments: w (uint8 pointer to the first
row), rows (int64 [R] byte offset of each row, all valid rows), kb (first block, with BB dividing the blocks per
row: no masks). Byte layouts: hybridmoe/quant/{simple,kquants}.py.
"""
from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# ggml type id -> (pieces per block P, bytes per word WB, BITS, OFF, has a min term). Type ids are constexprs in
# the kernels, so each format compiles to its own specialised code.
LAYOUT = {
    T.Q4_0: (1, 2, 4, 8, False),
    T.Q8_0: (1, 2, 8, 128, False),  # int8 q is stored as u = q + 128 (a flipped sign bit)
    T.Q4_K: (8, 4, 4, 0, True),
    T.Q5_K: (8, 4, 5, 0, True),
    T.Q6_K: (8, 2, 6, 32, False),
}
TYPE_SIZE = {q: GGML_QUANT_SIZES[q][1] for q in LAYOUT}  # bytes per block
BLOCK_SIZE = {q: GGML_QUANT_SIZES[q][0] for q in LAYOUT}  # elements per block


@triton.jit
def slot_of(ids, g, HAS_IDS: tl.constexpr):
    """The slot (int64) that matrix g of a grouped launch reads: ids[g], or g itself without ids."""
    if HAS_IDS:
        return tl.load(ids + g).to(tl.int64)
    return g.to(tl.int64)


@triton.jit
def _index(kb, BB: tl.constexpr, P: tl.constexpr, NA: tl.constexpr):
    """(block [J], piece in block [J], word index [NA, 1, 1]) of a tile."""
    j = tl.arange(0, BB * P)
    return kb + j // P, j % P, tl.arange(0, NA)[:, None, None]


@triton.jit
def _base(rows, b, TS: tl.constexpr):
    """Byte offset [1, R, J] of each block of the tile."""
    return (rows[:, None] + (b * TS).to(tl.int64)[None, :])[None, :, :]


@triton.jit
def _word(w, off, a, WB: tl.constexpr):
    """The WB-byte word at byte offset off [1, R, J] (+ WB * a), zero-extended to int32 [NA, R, J].

    Every word position loads on its own (a header word for each a too): one layout for the whole tile."""
    p = w + (off + a * WB)
    if WB == 4:
        return tl.load(p.to(tl.pointer_type(tl.int32)))
    else:
        return tl.load(p.to(tl.pointer_type(tl.uint16))).to(tl.int32)


@triton.jit
def _f16(h):
    return (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _elements(start, a, WB: tl.constexpr):
    """Element index [NA, 1, J] of byte 0 of each word: start [J] of the piece plus WB per word."""
    return start[None, None, :] + a * WB


@triton.jit
def _q4_0_load(w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    # d:f16 qs:16; element l is the low nibble of byte l, element l + 16 its high nibble
    b, _, a = _index(kb, BB, 1, NA)
    base = _base(rows, b, 18)
    return _word(w, base, a * 0, 2), _word(w, base + 2, a, 2)


@triton.jit
def _q4_0_decode(raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    dw, q = raw
    b, _, a = _index(kb, BB, 1, NA)
    d = _f16(dw)
    o = _elements(b * 32, a, 2)
    return q & 0x0F0F, d, 0.0, o, (q >> 4) & 0x0F0F, d, 0.0, o + 16


@triton.jit
def _q8_0_load(w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    # d:f16 qs:32 int8, as two parts of 16
    b, _, a = _index(kb, BB, 1, NA)
    base = _base(rows, b, 34)
    return _word(w, base, a * 0, 2), _word(w, base + 2, a, 2), _word(w, base + 18, a, 2)


@triton.jit
def _q8_0_decode(raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    dw, qa, qb = raw
    b, _, a = _index(kb, BB, 1, NA)
    d = _f16(dw)
    o = _elements(b * 32, a, 2)
    return qa ^ 0x8080, d, 0.0, o, qb ^ 0x8080, d, 0.0, o + 16


@triton.jit
def _k4_header(w, base, a):
    """Q4_K / Q5_K header words: d | dmin << 16, then scale bytes 0-3, 4-7, 8-11."""
    z = a * 0
    return _word(w, base, z, 4), _word(w, base + 4, z, 4), _word(w, base + 8, z, 4), _word(w, base + 12, z, 4)


@triton.jit
def _k4_scale_min(dd, w0, w1, w2, g):
    """Q4_K / Q5_K: (d * sc[g], dmin * m[g]) [NA, R, J] for group g [J] of each block.

    Groups 0-3 keep 6-bit sc / m in scale bytes g / 4+g; groups 4-7 take their low 4 bits from byte 8+g-4 and
    their top 2 bits from the top of bytes g-4 / 4+g-4, so every group reads the same three bytes at index g & 3.
    """
    lo = (g < 4)[None, None, :]
    sh = (8 * (g & 3))[None, None, :]
    s0 = (w0 >> sh) & 255
    s1 = (w1 >> sh) & 255
    s2 = (w2 >> sh) & 255
    sc = tl.where(lo, s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)).to(tl.float32)
    mn = tl.where(lo, s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)).to(tl.float32)
    return _f16(dd) * sc, _f16(dd >> 16) * mn


@triton.jit
def _q4_k_load(w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    # d dmin scales:12 qs:128; qs chunk c (32 bytes): low nibbles are group 2c, high nibbles group 2c + 1.
    # Piece p is 16 bytes: half p % 2 of chunk c = p // 2.
    b, p, a = _index(kb, BB, 8, NA)
    base = _base(rows, b, 144)
    return _k4_header(w, base, a) + (_word(w, base + (16 + p * 16)[None, None, :], a, 4),)


@triton.jit
def _q4_k_decode(raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    dd, w0, w1, w2, q = raw
    b, p, a = _index(kb, BB, 8, NA)
    c = p // 2
    sa, ma = _k4_scale_min(dd, w0, w1, w2, 2 * c)
    sb, mb = _k4_scale_min(dd, w0, w1, w2, 2 * c + 1)
    o = _elements(b * 256 + c * 64 + (p % 2) * 16, a, 4)
    return q & 0x0F0F0F0F, sa, ma, o, (q >> 4) & 0x0F0F0F0F, sb, mb, o + 32


@triton.jit
def _q5_k_load(w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    # d dmin scales:12 qh:32 qs:128; as Q4_K, and bit g of qh[l] is the 5th bit of element l of group g
    b, p, a = _index(kb, BB, 8, NA)
    base = _base(rows, b, 176)
    q = _word(w, base + (48 + p * 16)[None, None, :], a, 4)
    h = _word(w, base + (16 + (p % 2) * 16)[None, None, :], a, 4)
    return _k4_header(w, base, a) + (q, h)


@triton.jit
def _q5_k_decode(raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    dd, w0, w1, w2, q, h = raw
    b, p, a = _index(kb, BB, 8, NA)
    c = p // 2
    sa, ma = _k4_scale_min(dd, w0, w1, w2, 2 * c)
    sb, mb = _k4_scale_min(dd, w0, w1, w2, 2 * c + 1)
    h = h >> (2 * c)[None, None, :]
    o = _elements(b * 256 + c * 64 + (p % 2) * 16, a, 4)
    qa = (q & 0x0F0F0F0F) | ((h & 0x01010101) << 4)
    qb = ((q >> 4) & 0x0F0F0F0F) | ((h & 0x02020202) << 3)
    return qa, sa, ma, o, qb, sb, mb, o + 32


@triton.jit
def _q6_k_load(w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    # ql:128 qh:64 scales:16 (int8) d:f16. Piece p = (half h, ql run s of 32 bytes, 16-byte piece u).
    # Quarter s of a half takes the low nibbles of ql run s, quarter s + 2 the high nibbles; the two extra bits
    # of quarter i sit at bits 2i of the half's qh bytes. Scales are per 16 elements: bytes ea / 16 and
    # ea / 16 + 4 for the two parts, read from the even-aligned byte pairs that hold them.
    b, p, a = _index(kb, BB, 8, NA)
    base = _base(rows, b, 210)
    h = p // 4
    s = (p // 2) % 2
    u = p % 2
    z = a * 0
    pair = base + (192 + (h * 128 + s * 32 + u * 16) // 16 - u)[None, None, :]
    return (_word(w, base + (h * 64 + s * 32 + u * 16)[None, None, :], a, 2),
            _word(w, base + (128 + h * 32 + u * 16)[None, None, :], a, 2),
            _word(w, pair, z, 2), _word(w, pair + 4, z, 2), _word(w, base + 208, z, 2))


@triton.jit
def _q6_k_decode(raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    ql, qh, pa, pb, dw = raw
    b, p, a = _index(kb, BB, 8, NA)
    h = p // 4
    s = (p // 2) % 2
    u = p % 2
    qh = qh >> (2 * s)[None, None, :]
    shift = (8 * u)[None, None, :]
    sc_a = (pa >> shift) & 255
    sc_b = (pb >> shift) & 255
    d = _f16(dw)
    sa = d * (sc_a - ((sc_a & 128) << 1)).to(tl.float32)  # int8 from its byte
    sb = d * (sc_b - ((sc_b & 128) << 1)).to(tl.float32)
    o = _elements(b * 256 + h * 128 + s * 32 + u * 16, a, 2)  # part B is 64 elements further
    qa = (ql & 0x0F0F) | ((qh & 0x0303) << 4)
    qb = ((ql >> 4) & 0x0F0F) | (((qh >> 4) & 0x0303) << 4)
    return qa, sa, 0.0, o, qb, sb, 0.0, o + 64


@triton.jit
def load(QT: tl.constexpr, w, rows, kb, BB: tl.constexpr, NA: tl.constexpr):
    """The raw words of a tile (a tuple whose shape depends on the format). QT is a constexpr."""
    if QT == 2:
        return _q4_0_load(w, rows, kb, BB, NA)
    elif QT == 8:
        return _q8_0_load(w, rows, kb, BB, NA)
    elif QT == 12:
        return _q4_k_load(w, rows, kb, BB, NA)
    elif QT == 13:
        return _q5_k_load(w, rows, kb, BB, NA)
    else:
        tl.static_assert(QT == 14, "unsupported ggml type")
        return _q6_k_load(w, rows, kb, BB, NA)


@triton.jit
def decode(QT: tl.constexpr, raw, kb, BB: tl.constexpr, NA: tl.constexpr):
    """(qa, sa, ma, oa, qb, sb, mb, ob) of a loaded tile."""
    if QT == 2:
        return _q4_0_decode(raw, kb, BB, NA)
    elif QT == 8:
        return _q8_0_decode(raw, kb, BB, NA)
    elif QT == 12:
        return _q4_k_decode(raw, kb, BB, NA)
    elif QT == 13:
        return _q5_k_decode(raw, kb, BB, NA)
    else:
        tl.static_assert(QT == 14, "unsupported ggml type")
        return _q6_k_decode(raw, kb, BB, NA)


@triton.jit
def rounded(v, dtype: tl.constexpr):
    """float32 v rounded to dtype, to nearest even, as float32 (exact in dtype). bfloat16 by hand: Triton's
    interpreter truncates that cast, the GPU rounds it."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)
