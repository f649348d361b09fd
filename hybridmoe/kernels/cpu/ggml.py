"""Optional second route: ggml's hand-tuned CPU dot products, from the `libggml-cpu` that llama-cpp-python ships.

The activations are quantized as llama.cpp does (to Q8_0 for the 32-element formats, Q8_K for the K formats), so
results differ from the float32 path by that rounding (~1e-3 relative). Numba calls the C functions through ctypes
pointers inside a parallel loop over rows; those kernels embed addresses, so they are compiled per process, not cached.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .checks import activations, kernel_type, weights

# weight type -> (activation type, name of the dot product)
_DOTS = {
    T.Q4_0: (T.Q8_0, "ggml_vec_dot_q4_0_q8_0"),
    T.Q8_0: (T.Q8_0, "ggml_vec_dot_q8_0_q8_0"),
    T.Q2_K: (T.Q8_K, "ggml_vec_dot_q2_K_q8_K"),
    T.Q3_K: (T.Q8_K, "ggml_vec_dot_q3_K_q8_K"),
    T.Q4_K: (T.Q8_K, "ggml_vec_dot_q4_K_q8_K"),
    T.Q5_K: (T.Q8_K, "ggml_vec_dot_q5_K_q8_K"),
    T.Q6_K: (T.Q8_K, "ggml_vec_dot_q6_K_q8_K"),
}
GGML_TYPES = tuple(_DOTS)
_QUANTIZERS = {T.Q8_0: "quantize_row_q8_0", T.Q8_K: "quantize_row_q8_K"}


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "lib" / "libggml-cpu.so"
        if path.exists():
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    try:
        # its dependency libggml-base sits beside it; loading it first, globally, lets the loader resolve it
        for base in sorted(path.parent.glob("libggml-base.so*"))[:1]:
            ctypes.CDLL(str(base), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
        lib.ggml_cpu_init()  # fills ggml's f16 tables that the dot products read
    except OSError:
        return None
    return lib


def available() -> bool:
    """Whether llama-cpp-python's libggml-cpu could be loaded."""
    return _library() is not None


def _make_gemv(dot: Callable[..., Any]) -> Callable[..., None]:
    @njit(parallel=True)
    def run(xq: np.ndarray, w: np.ndarray, y: np.ndarray, k_dim: int) -> None:
        n, n_rows = y.shape
        for r in prange(n_rows):
            for t in range(n):
                out = y.ctypes.data + (t * n_rows + r) * 4
                dot(k_dim, out, 0, w[r].ctypes.data, 0, xq[t].ctypes.data, 0, 1)

    return run


@functools.cache
def _kernel(qtype: T) -> tuple[Callable[..., None], Callable[..., Any], T]:
    lib = _library()
    if lib is None:
        raise ValueError("ggml route unavailable: llama_cpp (llama-cpp-python) is not installed")
    act_type, dot_name = _DOTS[qtype]
    # pointers travel as size_t: the same ABI as void * on 64-bit targets, and numba passes plain integers
    ptr = ctypes.c_size_t
    dot = getattr(lib, dot_name)
    dot.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    dot.restype = None
    quantize = getattr(lib, _QUANTIZERS[act_type])
    quantize.argtypes = [ptr, ptr, ctypes.c_int64]
    quantize.restype = None
    return _make_gemv(dot), quantize, act_type


def gemv(x: np.ndarray, w_raw: np.ndarray, ggml_type: T | int) -> np.ndarray:
    """y[n, N] = q8(x)[n, K] @ W.T with W as raw GGUF rows; x float32 [n, K] C-contiguous."""
    qtype = kernel_type(ggml_type, GGML_TYPES)
    xa = activations(x)
    n, k_dim = xa.shape
    weights(w_raw, qtype, k_dim)
    run, quantize, act_type = _kernel(qtype)
    block, size = GGML_QUANT_SIZES[act_type]
    xq = np.empty((n, k_dim // block * size), dtype=np.uint8)
    for t in range(n):
        quantize(xa[t].ctypes.data, xq[t].ctypes.data, k_dim)
    y = np.empty((n, w_raw.shape[0]), dtype=np.float32)
    run(xq, w_raw, y, k_dim)
    return y
