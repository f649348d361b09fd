"""Input checks run by the GPU wrappers before every launch: each failure is a ValueError that names the problem.

The kernels do raw pointer arithmetic, so a wrong stride or size would read out of bounds instead of failing.
"""
from __future__ import annotations

import os

import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import as_qtype, get_format

from .formats import LAYOUT

GPU_TYPES = tuple(LAYOUT)
MAX_TOKENS = 8  # the decode kernels keep every token's partial sums in registers
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1): tensors then live on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_type(ggml_type: T | int) -> T:
    qtype = as_qtype(ggml_type)
    if qtype not in LAYOUT:
        raise ValueError(f"no GPU kernel for GGML type {qtype.name} (have: {', '.join(q.name for q in GPU_TYPES)})")
    return qtype


def device_of(name: str, t: torch.Tensor, device: torch.device | None = None) -> torch.device:
    """A CUDA device (or the CPU under the interpreter), the same as `device` when given."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} must be on a CUDA device, got {t.device} (CPU tensors need TRITON_INTERPRET=1)")
    return t.device


def contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def activations(x: torch.Tensor, k_dim: int | None = None, max_tokens: int | None = MAX_TOKENS) -> torch.Tensor:
    """float [n, K] (n <= max_tokens), contiguous; K checked when given."""
    device_of("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n_tokens >= 1, K], got shape {tuple(x.shape)}")
    if max_tokens is not None and x.shape[0] > max_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens; the GEMV kernels take at most {max_tokens} "
                         "(dequantize and matmul for more)")
    if k_dim is not None and x.shape[1] != k_dim:
        raise ValueError(f"x has K = {x.shape[1]}, the weight has {k_dim} columns")
    contiguous("x", x)
    return x


def raw_weight(name: str, w: torch.Tensor, qtype: T, k_dim: int | None = None, ndim: int = 2) -> int:
    """uint8 [..., N, row_bytes], contiguous, 4-byte aligned, whole blocks per row -> K (columns of W)."""
    device_of(name, w)
    fmt = get_format(qtype)
    if w.dtype != torch.uint8:
        raise ValueError(f"{name} must hold raw GGUF bytes as uint8, got {w.dtype}")
    if w.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims ([..., N, row_bytes]), got shape {tuple(w.shape)}")
    contiguous(name, w)
    if w.data_ptr() % 4:
        raise ValueError(f"{name} must start at a 4-byte aligned address (f16 scales are loaded as such)")
    if w.shape[-1] % fmt.type_size:
        raise ValueError(f"{name} rows have {w.shape[-1]} bytes, not a whole number of {qtype.name} blocks "
                         f"of {fmt.type_size} bytes")
    cols = w.shape[-1] // fmt.type_size * fmt.block_size
    if k_dim is not None and cols != k_dim:
        raise ValueError(f"{name} rows hold K = {cols} {qtype.name} values, expected {k_dim} "
                         f"({fmt.row_bytes(k_dim) if k_dim % fmt.block_size == 0 else 'not whole'} bytes)")
    if cols == 0 or w.shape[-2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(w.shape)}")
    return cols


def out_dtype(dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    dtype = default if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def slot_ids(ids: torch.Tensor, n_slots: int, device: torch.device) -> None:
    """int32/int64 [G] on the weights' device. Values are not range-checked: that would need a host sync."""
    device_of("ids", ids, device)
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty 1-D int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    contiguous("ids", ids)
    if n_slots <= 0:
        raise ValueError("there are no slots to index")
