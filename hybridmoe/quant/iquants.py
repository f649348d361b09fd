"""Lattice ("IQ") formats whose decoding needs large codebook grids.

These delegate to the `gguf` package's reference dequantization, which carries the grids; they are correct but
slow, and meant for loading, inspection and tests rather than hot paths.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from .base import BlockFormat


class GgufFallback(BlockFormat):
    """A format decoded by `gguf.quants.dequantize` instead of our own code."""

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return gguf_quants.dequantize(np.ascontiguousarray(blocks), cls.qtype).reshape(-1, cls.block_size)


class IQ2_XXS(GgufFallback, qtype=T.IQ2_XXS):
    """IQ2_XXS (2.06 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ2_XS(GgufFallback, qtype=T.IQ2_XS):
    """IQ2_XS (2.31 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ2_S(GgufFallback, qtype=T.IQ2_S):
    """IQ2_S (2.5 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ3_XXS(GgufFallback, qtype=T.IQ3_XXS):
    """IQ3_XXS (3.06 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ3_S(GgufFallback, qtype=T.IQ3_S):
    """IQ3_S (3.44 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ1_S(GgufFallback, qtype=T.IQ1_S):
    """IQ1_S (1.56 bits per weight); decoded by `gguf.quants.dequantize`."""
    f16_fields = (0,)


class IQ1_M(GgufFallback, qtype=T.IQ1_M):
    """IQ1_M (1.75 bits per weight); decoded by `gguf.quants.dequantize`."""
