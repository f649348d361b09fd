"""Typed wrappers around the numba kernels: they check dtypes, contiguity and shapes, then launch."""
from __future__ import annotations

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import as_qtype, get_format
from hybridmoe.quant import dequantize as reference_dequantize

from . import packed as packed_kernels
from .checks import Array, activations, kernel_type, weights
from .raw import KIND, W32, dequantize_rows, gemv_raw
from .repack import DEFAULT_LANES, PACKED_TYPES, PackedWeight, repack_raw

# (kernel, group size of the activation sums it takes)
_PACKED = {
    T.Q4_0: (packed_kernels.gemv_q4_0, 32),
    T.Q8_0: (packed_kernels.gemv_q8_0, 32),
    T.Q4_K: (packed_kernels.gemv_q4_k, 32),
    T.Q5_K: (packed_kernels.gemv_q5_k, 32),
    T.Q6_K: (packed_kernels.gemv_q6_k, 16),
}
GEMV_TYPES = tuple(KIND)
_PREFILL_TILE_ROWS = 512


def set_threads(n: int) -> None:
    """Threads used by every CPU kernel (default: all cores)."""
    numba.set_num_threads(n)


def _like_input(y: np.ndarray, x: Array) -> Array:
    return torch.from_numpy(y) if isinstance(x, torch.Tensor) else y


def gemv(x: Array, w_raw: np.ndarray, ggml_type: T | int) -> Array:
    """Decode: y[n, N] = x[n, K] @ W.T with W as raw GGUF rows (uint8 [N, row_bytes]); f32 in, f32 out.

    Activations stay float32 (no 8-bit rounding): the result matches dequantize-then-matmul to float32 rounding."""
    xa = activations(x)
    qtype = kernel_type(ggml_type, GEMV_TYPES)
    weights(w_raw, qtype, xa.shape[1])
    y = np.empty((xa.shape[0], w_raw.shape[0]), dtype=np.float32)
    gemv_raw(KIND[qtype], xa, w_raw, y, W32)
    return _like_input(y, x)


def repack(w_raw: np.ndarray, ggml_type: T | int, lanes: int = DEFAULT_LANES) -> PackedWeight:
    """Copy raw GGUF rows into the lane-interleaved layout that `gemv_packed` reads at memory speed."""
    qtype = kernel_type(ggml_type, PACKED_TYPES)
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    if not isinstance(w_raw, np.ndarray) or w_raw.ndim != 2:
        raise ValueError("w_raw must be a [N, row_bytes] numpy array")
    fmt = get_format(qtype)
    k_dim = w_raw.shape[1] // fmt.type_size * fmt.block_size
    weights(w_raw, qtype, k_dim)
    return repack_raw(w_raw, qtype, k_dim, lanes)


def gemv_packed(x: Array, w: PackedWeight) -> Array:
    """Decode over a repacked weight: y[n, N] = x[n, K] @ W.T."""
    xa = activations(x)
    if xa.shape[1] != w.n_cols:
        raise ValueError(f"x has K = {xa.shape[1]}, the weight has {w.n_cols} columns")
    kernel, group = _PACKED[w.qtype]
    xsum = xa.reshape(xa.shape[0], -1, group).sum(axis=-1)
    y = np.empty((xa.shape[0], w.n_rows), dtype=np.float32)
    kernel(xa, xsum, *w.arrays, y)
    return _like_input(y, x)


def _packed(xa: np.ndarray, w: PackedWeight) -> np.ndarray:
    kernel, group = _PACKED[w.qtype]
    y = np.empty((xa.shape[0], w.n_rows), dtype=np.float32)
    kernel(xa, xa.reshape(xa.shape[0], -1, group).sum(axis=-1), *w.arrays, y)
    return y


def ffn_packed(x: np.ndarray, gate: PackedWeight, up: PackedWeight, down: PackedWeight) -> np.ndarray:
    """One expert at decode, down(silu(gate(x)) * up(x)), from repacked weights: f32 [n, D] -> f32 [n, D].
    Checks once and calls the kernels directly, for the dozens of experts a decode step runs."""
    xa = activations(x)
    if xa.shape[1] != gate.n_cols or up.n_cols != gate.n_cols or down.n_cols != gate.n_rows:
        raise ValueError(f"expert shapes do not fit: x K={xa.shape[1]}, gate {gate.n_rows}x{gate.n_cols}, "
                         f"up {up.n_rows}x{up.n_cols}, down {down.n_rows}x{down.n_cols}")
    g = _packed(xa, gate)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu's limit, -0
        h = g / (np.float32(1) + np.exp(-g)) * _packed(xa, up)  # silu(gate) * up
    return _packed(np.ascontiguousarray(h, dtype=np.float32), down)


def dequantize(w_raw: np.ndarray, ggml_type: T | int, n_cols: int) -> np.ndarray:
    """Raw rows -> float32 [N, n_cols], multithreaded for kernel types, the numpy reference for the others."""
    qtype = as_qtype(ggml_type)
    weights(w_raw, qtype, n_cols)
    if qtype not in KIND:
        return reference_dequantize(w_raw, qtype, (w_raw.shape[0], n_cols))
    out = np.empty((w_raw.shape[0], n_cols), dtype=np.float32)
    dequantize_rows(KIND[qtype], w_raw, out, W32)
    return out


def matmul(x: Array, w_raw: np.ndarray, ggml_type: T | int) -> torch.Tensor:
    """Prefill: y[T, N] = x[T, K] @ W.T, dequantizing W in row tiles to float32 for torch.matmul."""
    xt = torch.from_numpy(activations(x))
    qtype = as_qtype(ggml_type)
    k_dim = xt.shape[1]
    weights(w_raw, qtype, k_dim)
    n_rows = w_raw.shape[0]
    y = torch.empty((xt.shape[0], n_rows), dtype=torch.float32)
    for r0 in range(0, n_rows, _PREFILL_TILE_ROWS):
        r1 = min(n_rows, r0 + _PREFILL_TILE_ROWS)
        tile = torch.from_numpy(dequantize(w_raw[r0:r1], qtype, k_dim))
        y[:, r0:r1] = xt @ tile.T
    return y
