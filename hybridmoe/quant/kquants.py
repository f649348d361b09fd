"""The 256-element "K" super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, and IQ4_XS.

Byte layouts (little-endian), per super-block of 256 elements:
  Q2_K    scales:16  qs:64  d:f16  dmin:f16        16 groups of 16; scale byte = sc | m << 4; x = d*sc*q - dmin*m
  Q3_K    hmask:32  qs:64  scales:12  d:f16        16 groups of 16; 6-bit signed scales; q = 2 bits - 4 * !hbit
  Q4_K    d:f16  dmin:f16  scales:12  qs:128       8 groups of 32; 6-bit sc and m; x = d*sc*q - dmin*m
  Q5_K    d:f16  dmin:f16  scales:12  qh:32  qs:128   as Q4_K with a 5th bit per element
  Q6_K    ql:128  qh:64  scales:16 (int8)  d:f16   16 groups of 16; q = 4 low + 2 high bits - 32
  IQ4_XS  d:f16  scales_h:2  scales_l:4  qs:128    8 groups of 32; 6-bit scales - 32; x = d*scale*KVALUES[q]
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import BlockFormat, bits, f16_at, nibbles
from .simple import IQ4_KVALUES


def unpack_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K / Q5_K -> (sc, m), uint8 [n, 8] each, 6 bits each.

    Bytes 0-3 hold sc[0:4] in their low 6 bits, bytes 4-7 hold m[0:4]; bytes 8-11 hold the low 4 bits of sc[4:8]
    (low nibble) and m[4:8] (high nibble), whose top 2 bits sit in the top bits of bytes 0-3 and 4-7.
    """
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & np.uint8(63), (c & np.uint8(15)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=-1)
    m = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, m


def _k4_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: per-group (d * sc, dmin * m) as float32 [n, 8, 1]."""
    sc, m = unpack_scale_min_k4(blocks[:, 4:16])
    n = blocks.shape[0]
    dl = (f16_at(blocks, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (f16_at(blocks, 2) * m.astype(np.float32)).reshape(n, 8, 1)
    return dl, ml


def _k4_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> [n, 8, 32]: 4 chunks of 32 bytes, low nibbles are group 2c, high nibbles group 2c + 1."""
    lo, hi = nibbles(qs.reshape(-1, 4, 1, 32))
    return np.concatenate([lo, hi], axis=2).reshape(-1, 8, 32)


class Q2_K(BlockFormat, qtype=T.Q2_K):
    f16_fields = (80, 82)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        sc, m = nibbles(blocks[:, :16])
        dl = (f16_at(blocks, 80) * sc.astype(np.float32)).reshape(n, 16, 1)
        ml = (f16_at(blocks, 82) * m.astype(np.float32)).reshape(n, 16, 1)
        # each half of 128 elements takes 32 bytes; shift 2*i gives elements [32 i, 32 i + 32) of the half
        q = bits(blocks[:, 16:80].reshape(n, 2, 32), 4, 2).reshape(n, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(n, 256)


class Q3_K(BlockFormat, qtype=T.Q3_K):
    f16_fields = (108,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        packed = blocks[:, 96:108]
        low4 = np.concatenate([packed[:, :8] & np.uint8(15), packed[:, :8] >> np.uint8(4)], axis=-1)
        high2 = bits(packed[:, 8:12], 4, 2).reshape(n, 16)
        scales = ((low4 | (high2 << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
        dl = (f16_at(blocks, 108) * scales).reshape(n, 16, 1)
        low = bits(blocks[:, 32:96].reshape(n, 2, 32), 4, 2).reshape(n, 16, 16)
        # hmask bit b of byte l belongs to element 32 b + l; a clear bit means "subtract 4"
        hbit = bits(blocks[:, :32], 8).reshape(n, 16, 16)
        q = (low.astype(np.int8) - ((hbit ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)).astype(np.float32)
        return (dl * q).reshape(n, 256)


class Q4_K(BlockFormat, qtype=T.Q4_K):
    f16_fields = (0, 2)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        dl, ml = _k4_scales(blocks)
        q = _k4_low_nibbles(blocks[:, 16:144]).astype(np.float32)
        return (dl * q - ml).reshape(-1, 256)


class Q5_K(BlockFormat, qtype=T.Q5_K):
    f16_fields = (0, 2)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        dl, ml = _k4_scales(blocks)
        # bit g of qh[l] is the 5th bit of element l of group g
        high = bits(blocks[:, 16:48], 8) << np.uint8(4)
        q = (_k4_low_nibbles(blocks[:, 48:176]) | high).astype(np.float32)
        return (dl * q - ml).reshape(-1, 256)


class Q6_K(BlockFormat, qtype=T.Q6_K):
    f16_fields = (208,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
        dl = (f16_at(blocks, 208) * scales).reshape(n, 16, 1)
        # per half of 128: ql bytes [0, 32) low nibble -> quarter 0, [32, 64) low -> 1, then high nibbles -> 2, 3
        lo, hi = nibbles(blocks[:, :128].reshape(n, 2, 64))
        low4 = np.concatenate([lo, hi], axis=-1).reshape(n, 2, 4, 32)
        high2 = bits(blocks[:, 128:192].reshape(n, 2, 32), 4, 2)
        q = (low4 | (high2 << np.uint8(4))).astype(np.int8) - np.int8(32)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


class IQ4_XS(BlockFormat, qtype=T.IQ4_XS):
    f16_fields = (0,)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        high = bits(np.ascontiguousarray(blocks[:, 2:4]).view(np.uint16), 8, 2).reshape(n, 8).astype(np.uint8)
        lo, hi = nibbles(blocks[:, 4:8])
        low = np.stack([lo, hi], axis=-1).reshape(n, 8)
        scales = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
        dl = (f16_at(blocks, 0) * scales).reshape(n, 8, 1)
        qlo, qhi = nibbles(blocks[:, 8:].reshape(n, 8, 16))
        q = IQ4_KVALUES[np.concatenate([qlo, qhi], axis=-1)].astype(np.float32)
        return (dl * q).reshape(n, 256)
