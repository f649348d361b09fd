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


def has_vnni() -> bool:
    """True if the code numba generates may use AVX-512 VNNI (NUMBA_CPU_FEATURES / NUMBA_CPU_NAME, else the host)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        features = "" if numba.config.CPU_NAME else llvm.get_host_cpu_features().flatten()
    return "+avx512vnni" in features.split(",")


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
    """acc + in every word: the sum over its 4 bytes of uint8(a byte) * int8(the same byte of b), b one int32 word
    (4 activation bytes) broadcast to all lanes."""
    vnni = has_vnni()

    def codegen(context, builder, sig, args):
        acc, a, word = args
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
