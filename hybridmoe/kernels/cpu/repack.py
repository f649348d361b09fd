"""Load-time repacking of raw GGUF rows into the lane-interleaved layout of `packed.py` (numpy, once per expert)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import unpack_scale_min_k4

DEFAULT_LANES = 64


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight [n_rows, n_cols] in the lane-interleaved layout; `arrays` are the kernel's operands after x, xsum."""

    qtype: T
    n_rows: int
    n_cols: int
    lanes: int
    arrays: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def _tiles(w_raw: np.ndarray, lanes: int, block_bytes: int) -> np.ndarray:
    """[N, row_bytes] -> [tiles, lanes, blocks, block_bytes], zero rows appended up to a whole tile."""
    n_rows, row_bytes = w_raw.shape
    n_tiles = -(-n_rows // lanes)
    padded = np.zeros((n_tiles * lanes, row_bytes), dtype=np.uint8)
    padded[:n_rows] = w_raw
    return padded.reshape(n_tiles, lanes, row_bytes // block_bytes, block_bytes)


def _f16_field(tiles: np.ndarray, offset: int) -> np.ndarray:
    """The f16 at `offset` of every block, float32 [tiles, blocks, lanes]."""
    half = np.ascontiguousarray(tiles[..., offset:offset + 2]).view(np.float16)[..., 0]
    return np.ascontiguousarray(half.astype(np.float32).transpose(0, 2, 1))


def _lane_minor(a: np.ndarray) -> np.ndarray:
    """[tiles, lanes, blocks, ...] -> [tiles, blocks, ..., lanes]."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _pack_q4_0(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    return _lane_minor(tiles[..., 2:]), _f16_field(tiles, 0)


def _pack_q8_0(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    return _lane_minor(tiles[..., 2:].view(np.int8)), _f16_field(tiles, 0)


def _pack_q4_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    n_tiles, lanes, n_blocks, _ = tiles.shape
    qs = _lane_minor(tiles[..., 16:])
    sc, m = unpack_scale_min_k4(tiles[..., 4:16].reshape(-1, 12))
    scm = np.stack([sc, m], axis=1).reshape(n_tiles, lanes, n_blocks, 2, 8)
    dd = np.stack([_f16_field(tiles, 0), _f16_field(tiles, 2)], axis=2)
    return qs, _lane_minor(scm), dd


def _pack_q5_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    qs, scm, dd = _pack_q4_k(np.concatenate([tiles[..., :16], tiles[..., 48:]], axis=-1))
    return qs, _lane_minor(tiles[..., 16:48]), scm, dd


def _pack_q6_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    sc = _lane_minor(tiles[..., 192:208].view(np.int8))
    return _lane_minor(tiles[..., :128]), _lane_minor(tiles[..., 128:192]), sc, _f16_field(tiles, 208)


_PACKERS = {T.Q4_0: (18, _pack_q4_0), T.Q8_0: (34, _pack_q8_0), T.Q4_K: (144, _pack_q4_k),
            T.Q5_K: (176, _pack_q5_k), T.Q6_K: (210, _pack_q6_k)}
PACKED_TYPES = tuple(_PACKERS)


def repack_raw(w_raw: np.ndarray, qtype: T, n_cols: int, lanes: int = DEFAULT_LANES) -> PackedWeight:
    block_bytes, pack = _PACKERS[qtype]
    return PackedWeight(qtype, w_raw.shape[0], n_cols, lanes, pack(_tiles(w_raw, lanes, block_bytes)))
