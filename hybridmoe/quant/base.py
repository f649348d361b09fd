"""Block format base class, the registry of formats, and whole-tensor dequantization."""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_REGISTRY: dict[GGMLQuantizationType, type["BlockFormat"]] = {}

# Bounds the float32 temporaries of one dequantization step (~ 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


class BlockFormat:
    """One GGML storage type: `block_size` elements are stored in `type_size` bytes.

    Subclasses register themselves with `class Q4_K(BlockFormat, qtype=GGMLQuantizationType.Q4_K)` and implement
    `dequantize_blocks`. They are never instantiated: the class is the format.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # byte offsets of the f16 scale fields inside a block (for making valid random blocks)
    f16_fields: ClassVar[tuple[int, ...]] = ()

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an intermediate base class, not a format
            return
        if qtype in _REGISTRY:
            raise TypeError(f"GGML type {qtype.name} is registered twice")
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _REGISTRY[qtype] = cls

    def __new__(cls, *args: object, **kwargs: object) -> "BlockFormat":
        raise TypeError(f"{cls.__name__} is a format, not something to instantiate")

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """uint8 [n, type_size] -> float32 [n, block_size]."""
        raise NotImplementedError

    @classmethod
    def row_bytes(cls, n_elements: int) -> int:
        """Bytes taken by `n_elements` consecutive elements (a multiple of `block_size`)."""
        if n_elements % cls.block_size:
            raise ValueError(f"{cls.qtype.name}: {n_elements} elements is not a multiple of {cls.block_size}")
        return n_elements // cls.block_size * cls.type_size


def random_blocks(ggml_type: GGMLQuantizationType | int, n_blocks: int, rng: np.random.Generator,
                  scale: float = 0.01) -> np.ndarray:
    """Random valid blocks, uint8 [n_blocks, type_size]: random bytes with finite f16 scales in [-scale, scale)."""
    fmt = get_format(ggml_type)
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.type_size), dtype=np.uint8)
    for offset in fmt.f16_fields:
        values = (rng.random((n_blocks, 1), dtype=np.float32) * 2 - 1) * scale
        blocks[:, offset:offset + 2] = values.astype(np.float16).view(np.uint8)
    return blocks


def as_qtype(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(ggml_type))
    except ValueError:
        raise ValueError(f"unknown GGML type id {int(ggml_type)}") from None


def get_format(ggml_type: GGMLQuantizationType | int) -> type[BlockFormat]:
    """The registered format of `ggml_type`; ValueError naming the type if it has none."""
    qtype = as_qtype(ggml_type)
    fmt = _REGISTRY.get(qtype)
    if fmt is None:
        raise ValueError(f"GGML type {qtype.name} is not supported (supported: {', '.join(supported_names())})")
    return fmt


def supported_names() -> list[str]:
    return sorted(q.name for q in _REGISTRY)


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType | int, shape: Sequence[int]) -> np.ndarray:
    """Raw GGUF bytes (uint8, any shape, C-contiguous) of a tensor of logical `shape` -> float32 array of `shape`."""
    fmt = get_format(ggml_type)
    shape = tuple(int(s) for s in shape)
    if raw.dtype != np.uint8:
        raise ValueError(f"raw must be uint8, got {raw.dtype}")
    if not shape or shape[-1] % fmt.block_size:
        raise ValueError(f"{fmt.qtype.name}: last dim of {shape} is not a multiple of block size {fmt.block_size}")
    n_blocks = int(np.prod(shape)) // fmt.block_size
    if raw.size != n_blocks * fmt.type_size:
        raise ValueError(f"{fmt.qtype.name}: {raw.size} bytes given, shape {shape} needs {n_blocks * fmt.type_size}")
    blocks = np.ascontiguousarray(raw).reshape(n_blocks, fmt.type_size)
    out = np.empty((n_blocks, fmt.block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // fmt.block_size)
    for start in range(0, n_blocks, step):
        out[start:start + step] = fmt.dequantize_blocks(blocks[start:start + step])
    return out.reshape(shape)


# Helpers shared by the format modules.

def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte `offset` of each block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) 4-bit halves of each byte."""
    return qs & np.uint8(0x0F), qs >> np.uint8(4)


def bits(plane: np.ndarray, count: int, width: int = 1) -> np.ndarray:
    """Fields of `width` bits, least significant first: [..., m] -> [..., count, m] with field i of every byte."""
    shifts = (np.arange(count, dtype=np.uint8) * np.uint8(width)).reshape(count, 1)
    return (plane[..., None, :] >> shifts) & np.uint8((1 << width) - 1)
