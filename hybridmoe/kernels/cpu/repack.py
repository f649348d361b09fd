"""Load-time repacking of raw GGUF rows into the lane-interleaved layouts of the kernels (numpy, once per expert):
`packed.py` (float32 activations, lanes = 64 rows per tile by default) and `int8.py` (8-bit activations, 16 rows per
tile, bytes grouped in 32-bit words of 4 consecutive positions of one row)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import unpack_scale_min_k4

DEFAULT_LANES = 64
INT8_LANES = 16
ACTIVATIONS = ("f32", "int8")


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight [n_rows, n_cols] in a lane-interleaved layout: for the kernels with float32 activations `arrays` are
    their operands after x, xsum; for 8-bit activations (q, s, d), each [tiles, ...]."""

    qtype: T
    n_rows: int
    n_cols: int
    lanes: int
    arrays: tuple[np.ndarray, ...]
    activations: str = "f32"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


@dataclass(frozen=True, slots=True)
class PackedExperts(PackedWeight):
    """The same weight of every expert of a layer, stacked: each of `arrays` is [E, ...] of a PackedWeight's."""

    @property
    def n_experts(self) -> int:
        return self.arrays[0].shape[0]

    def expert(self, e: int) -> PackedWeight:
        """Expert e's weight, as views into the stacked arrays."""
        return PackedWeight(self.qtype, self.n_rows, self.n_cols, self.lanes, tuple(a[e] for a in self.arrays),
                            self.activations)


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


# --- 8-bit activations (int8.py): every array is [tiles, ...] flattened after the tile axis ---
def _words(tiles: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of every block as words of 4 bytes, lane-minor: [tiles, blocks, words, lanes, 4]."""
    n_tiles, lanes, n_blocks, _ = tiles.shape
    field = tiles[..., start:stop].reshape(n_tiles, lanes, n_blocks, (stop - start) // 4, 4)
    return field.transpose(0, 2, 3, 1, 4)


def _flat(*parts: np.ndarray) -> np.ndarray:
    """Parts [tiles, blocks, ...] joined per block, as [tiles, bytes or values per tile]."""
    n_tiles, n_blocks = parts[0].shape[:2]
    return np.ascontiguousarray(np.concatenate([p.reshape(n_tiles, n_blocks, -1) for p in parts], axis=2)
                                ).reshape(n_tiles, -1)


def _no_scales(tiles: np.ndarray) -> np.ndarray:
    return np.zeros((tiles.shape[0], 0), dtype=np.uint8)


def _int8_q4_0(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    return _flat(_words(tiles, 2, 18)), _no_scales(tiles), _flat(_f16_field(tiles, 0))


def _int8_q8_0(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    # the dot-product instruction takes unsigned weight bytes: store q + 128 (the kernel takes 128 * sum(x) back)
    return _flat(_words(tiles, 2, 34) ^ np.uint8(0x80)), _no_scales(tiles), _flat(_f16_field(tiles, 0))


def _int8_k4_scales(tiles: np.ndarray, dd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_tiles, lanes, n_blocks, _ = tiles.shape
    sc, m = unpack_scale_min_k4(tiles[..., 4:16].reshape(-1, 12))
    scm = np.stack([sc, m], axis=1).reshape(n_tiles, lanes, n_blocks, 2, 8)
    return _flat(_lane_minor(scm)), _flat(dd)


def _int8_q4_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    dd = np.stack([_f16_field(tiles, 0), _f16_field(tiles, 2)], axis=2)
    return (_flat(_words(tiles, 16, 144)), *_int8_k4_scales(tiles, dd))


def _int8_q5_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    dd = np.stack([_f16_field(tiles, 0), _f16_field(tiles, 2)], axis=2)
    return (_flat(_words(tiles, 48, 176), _words(tiles, 16, 48)), *_int8_k4_scales(tiles, dd))


def _int8_q6_k(tiles: np.ndarray) -> tuple[np.ndarray, ...]:
    return _flat(_words(tiles, 0, 128), _words(tiles, 128, 192)), _flat(_lane_minor(tiles[..., 192:208])), \
        _flat(_f16_field(tiles, 208))


_INT8_PACKERS = {T.Q4_0: _int8_q4_0, T.Q8_0: _int8_q8_0, T.Q4_K: _int8_q4_k, T.Q5_K: _int8_q5_k,
                 T.Q6_K: _int8_q6_k}


def repack_raw(w_raw: np.ndarray, qtype: T, n_cols: int, lanes: int = DEFAULT_LANES,
               activations: str = "f32") -> PackedWeight:
    block_bytes, pack = _PACKERS[qtype]
    if activations == "int8":
        lanes, pack = INT8_LANES, _INT8_PACKERS[qtype]
    return PackedWeight(qtype, w_raw.shape[0], n_cols, lanes, pack(_tiles(w_raw, lanes, block_bytes)), activations)


def repack_experts_raw(raw: np.ndarray, qtype: T, n_cols: int, activations: str = "f32") -> PackedExperts:
    """raw [E, N, row_bytes] -> every expert repacked into one stacked copy (made expert by expert, so the
    temporary memory is one expert's)."""
    stacked = None
    for e in range(raw.shape[0]):
        one = repack_raw(np.ascontiguousarray(raw[e]), qtype, n_cols, activations=activations)
        if stacked is None:
            stacked = tuple(np.empty((raw.shape[0], *a.shape), dtype=a.dtype) for a in one.arrays)
        for dst, src in zip(stacked, one.arrays):
            dst[e] = src
    return PackedExperts(qtype, one.n_rows, n_cols, one.lanes, stacked, activations)
