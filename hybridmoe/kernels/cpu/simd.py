"""Explicit 16-lane vectors for the 8-bit-activation kernels (`int8.py`), as numba intrinsics.

LLVM's auto-vectoriser never forms integer dot-product instructions from numba loops over the lane-interleaved
layout (it emits 256-bit multiply-adds of 16-bit values, 1.3x the float32 kernels), so these kernels say what they
want: `dpbusd` is AVX-512 VNNI's vpdpbusd (16 lanes x 4 bytes of unsigned weights times 4 broadcast signed
activation bytes, summed into int32) where the compile target has it, and the same sums in generic LLVM vector code
elsewhere (then LLVM picks the instructions). Integer sums are exact, so both give bit-identical results.

`ivec` is <16 x i32>, `fvec` is <16 x float>. Loads and stores take a 1-D array and an element index and do no
bounds check: the kernels index within the layouts `repack.py` makes.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

I32 = ir.IntType(32)
I32x16 = ir.VectorType(I32, 16)
F32x16 = ir.VectorType(ir.FloatType(), 16)


def _has(feature: str) -> bool:
    """True if the code numba generates may use `feature` (NUMBA_CPU_FEATURES / NUMBA_CPU_NAME, else the host)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        features = "" if numba.config.CPU_NAME else llvm.get_host_cpu_features().flatten()
    return f"+{feature}" in features.split(",")


def has_vnni() -> bool:
    return _has("avx512vnni")


class _IVec(types.Type):
    def __init__(self):
        super().__init__(name="i32x16")


class _FVec(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


ivec, fvec = _IVec(), _FVec()


@register_model(_IVec)
class _IVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, I32x16)


@register_model(_FVec)
class _FVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, F32x16)


def _pointer(context, builder, array_type, array, index, element):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), element.as_pointer())


def _splat(builder, value, vector_type):
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(I32x16, [0] * 16))


def _as_vector(builder, value):
    """A float operand as <16 x float>: vectors pass, scalars are broadcast."""
    if isinstance(value.type, ir.VectorType):
        return value
    if value.type != ir.FloatType():
        value = builder.fptrunc(value, ir.FloatType())
    return _splat(builder, value, F32x16)


@intrinsic
def izero(typingctx):
    return ivec(), lambda context, builder, sig, args: ir.Constant(I32x16, [0] * 16)


@intrinsic
def fzero(typingctx):
    return fvec(), lambda context, builder, sig, args: ir.Constant(F32x16, [0.0] * 16)


@intrinsic
def load_words(typingctx, array, index):
    """64 bytes of a uint8 array from `index` on, as 16 int32 words (4 bytes of one lane each)."""
    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], *args, I32x16), align=1)
    return ivec(array, types.intp), codegen


@intrinsic
def load_floats(typingctx, array, index):
    """16 float32 of a float32 array from `index` on."""
    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], *args, F32x16), align=1)
    return fvec(array, types.intp), codegen


def _byte_loader(signed: bool):
    @intrinsic
    def load(typingctx, array, index):
        def codegen(context, builder, sig, args):
            v = builder.load(_pointer(context, builder, sig.args[0], *args, ir.VectorType(ir.IntType(8), 16)), align=1)
            return builder.sitofp(v, F32x16) if signed else builder.uitofp(v, F32x16)
        return fvec(array, types.intp), codegen
    return load


load_u8_floats = _byte_loader(False)  # 16 bytes of a uint8 array as float32 (0..255)
load_i8_floats = _byte_loader(True)  # 16 bytes of a uint8 array read as int8, as float32


@intrinsic
def store_floats(typingctx, array, index, v):
    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1], F32x16), align=1)
    return types.none(array, types.intp, fvec), codegen


@intrinsic
def bits(typingctx, v, shift, mask):
    """(v >> shift) & mask in every word (shift >= 0 a logical right shift, < 0 a left shift by -shift)."""
    def codegen(context, builder, sig, args):
        w, s, m = args[0], builder.trunc(args[1], I32), builder.trunc(args[2], I32)
        right = builder.lshr(w, _splat(builder, s, I32x16))
        left = builder.shl(w, _splat(builder, builder.neg(s), I32x16))
        shifted = builder.select(builder.icmp_signed(">=", s, ir.Constant(I32, 0)), right, left)
        return builder.and_(shifted, _splat(builder, m, I32x16))
    return ivec(v, types.int64, types.int64), codegen


@intrinsic
def bor(typingctx, a, b):
    return ivec(a, b), lambda context, builder, sig, args: builder.or_(*args)


@intrinsic
def dpbusd(typingctx, acc, a, b):
    """acc + in every word: the sum over its 4 bytes of uint8(a byte) * int8(the same byte of b); b is one int32
    word (4 activation bytes) broadcast to all lanes, or a vector of 16 words (each lane its own 4 bytes)."""
    vnni = has_vnni()

    def codegen(context, builder, sig, args):
        acc, a, word = args
        if isinstance(word.type, ir.VectorType):
            b = word
        else:
            b = _splat(builder, builder.trunc(word, I32) if word.type != I32 else word, I32x16)
        if vnni:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32x16, [I32x16] * 3),
                                                "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [acc, a, b])
        bytes64, wide = ir.VectorType(ir.IntType(8), 64), ir.VectorType(I32, 64)
        products = builder.mul(builder.zext(builder.bitcast(a, bytes64), wide),
                               builder.sext(builder.bitcast(b, bytes64), wide))
        for i in range(4):  # byte i of every word
            every_4th = ir.Constant(I32x16, list(range(i, 64, 4)))
            acc = builder.add(acc, builder.shuffle_vector(products, products, every_4th))
        return acc
    return ivec(acc, a, b), codegen


@intrinsic
def to_floats(typingctx, v):
    return fvec(v), lambda context, builder, sig, args: builder.sitofp(args[0], F32x16)


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (b, c: a vector or a scalar)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32x16, [F32x16] * 3), "llvm.fma.v16f32")
        return builder.call(fn, [_as_vector(builder, v) for v in args])
    return fvec(a, b, c), codegen


@intrinsic
def mul(typingctx, a, b):
    """a * b (b: a vector or a scalar)."""
    def codegen(context, builder, sig, args):
        return builder.fmul(*(_as_vector(builder, v) for v in args))
    return fvec(a, b), codegen


@intrinsic
def sub(typingctx, a, b):
    """a - b (b: a vector or a scalar)."""
    def codegen(context, builder, sig, args):
        return builder.fsub(*(_as_vector(builder, v) for v in args))
    return fvec(a, b), codegen


@intrinsic
def halves(typingctx, a, b):
    """A float vector whose lanes 0-7 are a and lanes 8-15 are b (scalars)."""
    def codegen(context, builder, sig, args):
        lo, hi = (_as_vector(builder, v) for v in args)
        return builder.shuffle_vector(lo, hi, ir.Constant(I32x16, [0] * 8 + [16] * 8))
    return fvec(a, b), codegen


@intrinsic
def hsum(typingctx, v):
    """The sum of the 16 lanes of v, as float32, in a fixed order (pairwise: lanes i and i + 8, then i + 4, ...)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        width = 16
        while width > 1:
            width //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width, 2 * width))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(I32, 0))
    return types.float32(v), codegen


@intrinsic
def bxor(typingctx, v, mask):
    """v ^ mask in every word."""
    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _splat(builder, builder.trunc(args[1], I32), I32x16))
    return ivec(v, types.int64), codegen


@intrinsic
def load_halves(typingctx, array, i, j):
    """32 bytes of a uint8 array from `i` on as lanes 0-7, 32 bytes from `j` on as lanes 8-15 (int32 words)."""
    def codegen(context, builder, sig, args):
        half = ir.VectorType(I32, 8)
        lo = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], half), align=1)
        hi = builder.load(_pointer(context, builder, sig.args[0], args[0], args[2], half), align=1)
        return builder.shuffle_vector(lo, hi, ir.Constant(I32x16, list(range(16))))
    return ivec(array, types.intp, types.intp), codegen


@intrinsic
def load_half(typingctx, array, index):
    """The little-endian float16 at bytes index, index + 1 of a uint8 array, as float32 (vcvtph2ps)."""
    def codegen(context, builder, sig, args):
        h = builder.load(_pointer(context, builder, sig.args[0], *args, ir.IntType(16)), align=1)
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
    return types.float32(array, types.intp), codegen


@intrinsic
def k4_scales(typingctx, array, index):
    """The 12 packed scale bytes of a Q4_K / Q5_K block at `index`, unpacked as 16 floats: the 6-bit scales of
    groups 0-3, the mins of groups 0-3, the scales of groups 4-7, the mins of groups 4-7."""
    def codegen(context, builder, sig, args):
        v4 = ir.VectorType(I32, 4)
        c4 = lambda *vs: ir.Constant(v4, list(vs))  # noqa: E731
        u = builder.load(_pointer(context, builder, sig.args[0], *args, v4), align=1)  # bytes 0-15: 12 used
        # per word (4 groups at once): scales 0-3 = u0 & 63, mins 0-3 = u1 & 63, scales 4-7 = (u2 & 15) | the top
        # bits of u0 at bits 4-5, mins 4-7 = (u2 >> 4) | the top bits of u1 there
        low = builder.and_(builder.lshr(builder.shuffle_vector(u, u, c4(0, 1, 2, 2)), c4(0, 0, 0, 4)),
                           c4(0x3F3F3F3F, 0x3F3F3F3F, 0x0F0F0F0F, 0x0F0F0F0F))
        high = builder.and_(builder.lshr(builder.shuffle_vector(u, u, c4(0, 0, 0, 1)), c4(2, 2, 2, 2)),
                            c4(0, 0, 0x30303030, 0x30303030))
        bytes16 = builder.bitcast(builder.or_(low, high), ir.VectorType(ir.IntType(8), 16))
        return builder.uitofp(builder.zext(bytes16, I32x16), F32x16)
    return fvec(array, types.intp), codegen


@intrinsic
def spread(typingctx, v, i, j):
    """A float vector whose lanes 0-7 are lane i of v and lanes 8-15 lane j (i, j: constants)."""
    if not isinstance(i, types.IntegerLiteral) or not isinstance(j, types.IntegerLiteral):
        return None
    lanes = [i.literal_value] * 8 + [j.literal_value] * 8

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(I32x16, lanes))
    return fvec(v, i, j), codegen


@intrinsic
def quarters(typingctx, v, first):
    """A float vector whose lanes 4q..4q+3 are lane first + q of v (first: a constant)."""
    if not isinstance(first, types.IntegerLiteral):
        return None
    lanes = [first.literal_value + q for q in range(4) for _ in range(4)]

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(I32x16, lanes))
    return fvec(v, first), codegen


@intrinsic
def spread4(typingctx, v, a, b, c, d):
    """A float vector whose lanes 4q..4q+3 are lane (a, b, c, d)[q] of v (constants)."""
    picks = (a, b, c, d)
    if not all(isinstance(i, types.IntegerLiteral) for i in picks):
        return None
    lanes = [i.literal_value for i in picks for _ in range(4)]

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(I32x16, lanes))
    return fvec(v, a, b, c, d), codegen


@intrinsic
def load_nibble_floats(typingctx, array, index, upper):
    """The low (upper=0) or high (upper=1) nibbles of 16 bytes of a uint8 array, as float32 (upper: a constant)."""
    if not isinstance(upper, types.IntegerLiteral):
        return None
    shift = 4 * upper.literal_value

    def codegen(context, builder, sig, args):
        v = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), 16)),
                         align=1)
        v = builder.and_(builder.lshr(v, ir.Constant(v.type, [shift] * 16)), ir.Constant(v.type, [15] * 16))
        return builder.uitofp(v, F32x16)
    return fvec(array, types.intp, upper), codegen


@intrinsic
def q3_scales(typingctx, array, index):
    """The 12 packed scale bytes of a Q3_K block at `index` as its 16 signed 6-bit scales (minus 32), as floats."""
    def codegen(context, builder, sig, args):
        arr, index = args
        c = lambda v: ir.Constant(I32, v)  # noqa: E731
        at = lambda k: builder.add(index, ir.Constant(index.type, k))  # noqa: E731
        a = [builder.load(_pointer(context, builder, sig.args[0], arr, at(4 * i), I32), align=1) for i in range(3)]
        low = [a[0], a[1], builder.lshr(a[0], c(4)), builder.lshr(a[1], c(4))]
        words = [builder.or_(builder.and_(lw, c(0x0F0F0F0F)),
                             builder.shl(builder.and_(builder.lshr(a[2], c(2 * q)), c(0x03030303)), c(4)))
                 for q, lw in enumerate(low)]
        vec = ir.Constant(ir.VectorType(I32, 4), ir.Undefined)
        for i, w in enumerate(words):
            vec = builder.insert_element(vec, w, c(i))
        scales = builder.uitofp(builder.zext(builder.bitcast(vec, ir.VectorType(ir.IntType(8), 16)), I32x16), F32x16)
        return builder.fsub(scales, ir.Constant(F32x16, [32.0] * 16))
    return fvec(array, types.intp), codegen


@intrinsic
def bit_to(typingctx, v, first, second, to):
    """Bit `first` of every byte in lanes 0-7 and bit `second` in lanes 8-15, moved to bit `to` of the same byte,
    all other bits clear (constants). Q3_K's and Q5_K's high bits, whose 32 bytes fill both halves of v."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (first, second, to)):
        return None
    shifts = [to.literal_value - a.literal_value for a in (first, second)]

    def codegen(context, builder, sig, args):
        moved = [builder.shl(args[0], _splat(builder, ir.Constant(I32, n), I32x16)) if n >= 0 else
                 builder.lshr(args[0], _splat(builder, ir.Constant(I32, -n), I32x16)) for n in shifts]
        both = builder.shuffle_vector(*moved, ir.Constant(I32x16, list(range(8)) + list(range(24, 32))))
        return builder.and_(both, ir.Constant(I32x16, [0x01010101 << to.literal_value] * 16))
    return ivec(v, first, second, to), codegen


IQ4_LEVELS = (1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241)  # IQ4_NL's levels + 128


@intrinsic
def iq4_levels(typingctx, v):
    """Each byte of v (an index 0-15) replaced by IQ4_NL's level there + 128, an unsigned byte: AVX-512BW's vpshufb
    where the target has it, else 16 compares and selects (LLVM's generic vector code)."""
    shuffle = _has("avx512bw")

    def codegen(context, builder, sig, args):
        b64 = ir.VectorType(ir.IntType(8), 64)
        idx = builder.bitcast(args[0], b64)
        if shuffle:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(b64, [b64, b64]),
                                                "llvm.x86.avx512.pshuf.b.512")
            out = builder.call(fn, [ir.Constant(b64, list(IQ4_LEVELS) * 4), idx])
        else:
            out = ir.Constant(b64, [0] * 64)
            for k, level in enumerate(IQ4_LEVELS):
                hit = builder.icmp_unsigned("==", idx, ir.Constant(b64, [k] * 64))
                out = builder.select(hit, ir.Constant(b64, [level] * 64), out)
        return builder.bitcast(out, I32x16)
    return ivec(v), codegen


@intrinsic
def iq4_xs_scales(typingctx, array, index):
    """The 8 sub-block scales of an IQ4_XS block at `index` (6 bits, minus 32) as floats in lanes 0-7; lanes 8-15
    are 0."""
    def codegen(context, builder, sig, args):
        arr, index = args
        i32x8 = ir.VectorType(I32, 8)
        at = lambda k: builder.add(index, ir.Constant(index.type, k))  # noqa: E731
        low = builder.load(_pointer(context, builder, sig.args[0], arr, at(4), I32), align=1)
        high = builder.zext(builder.load(_pointer(context, builder, sig.args[0], arr, at(2), ir.IntType(16)),
                                         align=1), I32)
        splat8 = lambda w: builder.shuffle_vector(  # noqa: E731
            builder.insert_element(ir.Constant(i32x8, ir.Undefined), w, ir.Constant(I32, 0)),
            ir.Constant(i32x8, ir.Undefined), ir.Constant(i32x8, [0] * 8))
        lo = builder.and_(builder.lshr(splat8(low), ir.Constant(i32x8, [4 * s for s in range(8)])),
                          ir.Constant(i32x8, [15] * 8))
        hi = builder.and_(builder.lshr(splat8(high), ir.Constant(i32x8, [2 * s for s in range(8)])),
                          ir.Constant(i32x8, [3] * 8))
        ls = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(i32x8, [4] * 8))), ir.Constant(i32x8, [32] * 8))
        wide = builder.shuffle_vector(ls, ir.Constant(i32x8, [0] * 8), ir.Constant(I32x16, list(range(16))))
        return builder.sitofp(wide, F32x16)
    return fvec(array, types.intp), codegen


@intrinsic
def q6_high(typingctx, qh, upper):
    """The 2 high bits of Q6_K quants at bits 4-5 of each byte, from qh words (both halves of the vector the same
    32 qh bytes): for the low nibbles (upper=0) bits 0-1 in lanes 0-7 and bits 2-3 in lanes 8-15, for the high
    nibbles (upper=1) bits 4-5 and 6-7 (upper: a constant)."""
    if not isinstance(upper, types.IntegerLiteral):
        return None
    up = upper.literal_value

    def codegen(context, builder, sig, args):
        amounts = ir.Constant(I32x16, ([0] * 8 + [2] * 8) if up else ([4] * 8 + [2] * 8))
        moved = builder.lshr(args[0], amounts) if up else builder.shl(args[0], amounts)
        return builder.and_(moved, ir.Constant(I32x16, [0x30303030] * 16))
    return ivec(qh, upper), codegen


@intrinsic
def add(typingctx, a, b):
    """a + b (float vectors)."""
    return fvec(a, b), lambda context, builder, sig, args: builder.fadd(*args)


def _lane_addresses(context, builder, array_type, array, start, stride, valid):
    """<16 x i64> byte addresses of array[start + lane * stride] for lanes below `valid`; the lanes past it repeat
    the last valid lane's address (rows past a matrix's end are read as its last row and their results dropped)."""
    i64 = ir.IntType(64)
    v64 = ir.VectorType(i64, 16)
    data = context.make_array(array_type)(context, builder, array).data
    base = builder.ptrtoint(builder.gep(data, [start]), i64)

    def splat(value):
        one = builder.insert_element(ir.Constant(v64, ir.Undefined), value, ir.Constant(I32, 0))
        return builder.shuffle_vector(one, ir.Constant(v64, ir.Undefined), ir.Constant(I32x16, [0] * 16))

    lanes = ir.Constant(v64, list(range(16)))
    last = splat(builder.sub(builder.sext(valid, i64) if valid.type != i64 else valid, ir.Constant(i64, 1)))
    lane = builder.select(builder.icmp_signed("<", lanes, last), lanes, last)
    step = splat(builder.sext(stride, i64) if stride.type != i64 else stride)
    return builder.add(splat(base), builder.mul(lane, step))


def _gather(builder, addresses, element):
    """The 16 values of type `element` (i32 or i16) at `addresses` (one masked gather, all lanes on)."""
    vec = ir.VectorType(element, 16)
    ptrs = builder.inttoptr(addresses, ir.VectorType(element.as_pointer(), 16))
    mask = ir.VectorType(ir.IntType(1), 16)
    name = f"llvm.masked.gather.v16i{element.width}.v16p0"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [ptrs.type, I32, mask, vec]), name)
    return builder.call(fn, [ptrs, ir.Constant(I32, 1), ir.Constant(mask, [1] * 16), ir.Constant(vec, ir.Undefined)])


@intrinsic
def gather_words(typingctx, array, start, stride, valid):
    """The 4 bytes at start + lane * stride of a uint8 array, as lane `lane`'s int32 word (16 rows of a matrix, one
    word of each; lanes >= valid repeat lane valid - 1)."""
    def codegen(context, builder, sig, args):
        return _gather(builder, _lane_addresses(context, builder, sig.args[0], *args), I32)
    return ivec(array, types.intp, types.intp, types.intp), codegen


@intrinsic
def gather_halves(typingctx, array, start, stride, valid):
    """The little-endian float16 at start + lane * stride of a uint8 array, as float32 in lane `lane` (lanes >= valid
    repeat lane valid - 1)."""
    def codegen(context, builder, sig, args):
        h = _gather(builder, _lane_addresses(context, builder, sig.args[0], *args), ir.IntType(16))
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), F32x16)
    return fvec(array, types.intp, types.intp, types.intp), codegen


@intrinsic
def store_words(typingctx, array, index, v):
    """The 16 words of v as 64 bytes of a uint8 array from `index` on."""
    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1], I32x16), align=1)
    return types.none(array, types.intp, ivec), codegen


@intrinsic
def store_bytes(typingctx, array, index, v):
    """The low byte of each of the 16 words of v as 16 bytes of a uint8 array from `index` on."""
    def codegen(context, builder, sig, args):
        b16 = ir.VectorType(ir.IntType(8), 16)
        builder.store(builder.trunc(args[2], b16), _pointer(context, builder, sig.args[0], args[0], args[1], b16),
                      align=1)
    return types.none(array, types.intp, ivec), codegen


def _butterfly(builder, vecs):
    """16 <16 x i32> rows -> their transpose (vector j's lane i = row i's lane j): four stages that swap the
    off-diagonal blocks of 8, 4, 2 and 1 lanes between row pairs, one two-input shuffle per row and stage."""
    for b in (8, 4, 2, 1):
        out = list(vecs)
        for r in range(16):
            if r & b:
                continue
            low = [c if c & b == 0 else 16 + c - b for c in range(16)]  # row r keeps its lanes c & b == 0
            high = [c + b if c & b == 0 else 16 + c for c in range(16)]  # row r | b takes row r's others
            out[r] = builder.shuffle_vector(vecs[r], vecs[r | b], ir.Constant(I32x16, low))
            out[r | b] = builder.shuffle_vector(vecs[r], vecs[r | b], ir.Constant(I32x16, high))
        vecs = out
    return vecs


@intrinsic
def transpose_rows(typingctx, array, start, stride, valid, out, at):
    """The 64 bytes at start + row * stride of a uint8 array, for 16 rows (rows >= valid repeat row valid - 1), into
    out[at + 64 j ...] as 16 words of 16 lanes: word j's lane i = row i's j-th 4 bytes. The same words as 16
    `gather_words` at start + 4 j, from 16 plain loads and 64 two-vector shuffles."""
    def codegen(context, builder, sig, args):
        arr, start, stride, valid, out, at = args
        i64 = ir.IntType(64)
        last = builder.sub(valid, ir.Constant(valid.type, 1))
        rows = []
        for i in range(16):
            row = builder.select(builder.icmp_signed("<", ir.Constant(valid.type, i), last),
                                 ir.Constant(valid.type, i), last)
            index = builder.add(start, builder.mul(row, stride))
            rows.append(builder.load(_pointer(context, builder, sig.args[0], arr, index, I32x16), align=1))
        for j, v in enumerate(_butterfly(builder, rows)):
            index = builder.add(at, ir.Constant(i64, 64 * j))
            builder.store(v, _pointer(context, builder, sig.args[4], out, index, I32x16), align=1)
    return types.none(array, types.intp, types.intp, types.intp, out, types.intp), codegen


@intrinsic
def half_floats(typingctx, v, upper):
    """The float16 in the low (upper=0) or high (upper=1) 16 bits of every word of v, as float32 (a constant)."""
    if not isinstance(upper, types.IntegerLiteral):
        return None
    shift = 16 * upper.literal_value

    def codegen(context, builder, sig, args):
        w = builder.lshr(args[0], _splat(builder, ir.Constant(I32, shift), I32x16)) if shift else args[0]
        h = builder.trunc(w, ir.VectorType(ir.IntType(16), 16))
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), 16)), F32x16)
    return fvec(v, upper), codegen
