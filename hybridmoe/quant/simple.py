"""Plain float types and the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL).

Byte layouts (little-endian), per block of 32 elements:
  Q4_0    d:f16  qs:16                 x = d * (q - 8),  q = 4 bits
  Q4_1    d:f16  m:f16  qs:16          x = d * q + m
  Q5_0    d:f16  qh:4  qs:16           x = d * (q - 16), q = 4 low bits from qs, 5th bit from qh
  Q5_1    d:f16  m:f16  qh:4  qs:16    x = d * q + m
  Q8_0    d:f16  qs:32 (int8)          x = d * q
  IQ4_NL  d:f16  qs:16                 x = d * KVALUES[q]
In the 16 nibble bytes, element j is the low nibble of byte j and element j + 16 its high nibble; bit j of qh
(read as a little-endian u32) is the 5th bit of element j.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import BlockFormat, f16_at, nibbles

IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


class F32(BlockFormat, qtype=T.F32):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32)


class F16(BlockFormat, qtype=T.F16):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


class BF16(BlockFormat, qtype=T.BF16):
    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # bf16 is the top half of an f32
        return (np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _nibble_values(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> the 32 4-bit values in element order."""
    lo, hi = nibbles(qs)
    return np.concatenate([lo, hi], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


class Q4_0(BlockFormat, qtype=T.Q4_0):
    f16_fields = (0,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = _nibble_values(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return f16_at(blocks, 0) * q.astype(np.float32)


class Q4_1(BlockFormat, qtype=T.Q4_1):
    f16_fields = (0, 2)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = _nibble_values(blocks[:, 4:]).astype(np.float32)
        return f16_at(blocks, 0) * q + f16_at(blocks, 2)


class Q5_0(BlockFormat, qtype=T.Q5_0):
    f16_fields = (0,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = _nibble_values(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])
        return f16_at(blocks, 0) * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


class Q5_1(BlockFormat, qtype=T.Q5_1):
    f16_fields = (0, 2)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = _nibble_values(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])
        return f16_at(blocks, 0) * q.astype(np.float32) + f16_at(blocks, 2)


class Q8_0(BlockFormat, qtype=T.Q8_0):
    f16_fields = (0,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8)
        return f16_at(blocks, 0) * q.astype(np.float32)


class IQ4_NL(BlockFormat, qtype=T.IQ4_NL):
    f16_fields = (0,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        q = IQ4_KVALUES[_nibble_values(blocks[:, 2:])]
        return f16_at(blocks, 0) * q.astype(np.float32)
