"""Input checks shared by the kernel wrappers: each failure is a ValueError that names the problem."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import as_qtype, get_format

Array = np.ndarray | torch.Tensor


def activations(x: Array) -> np.ndarray:
    """float32 [n >= 1, K], C-contiguous, on the CPU -> its numpy view (no copy)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"x must be on the CPU, got {x.device}")
        x = x.detach().numpy() if x.requires_grad else x.numpy()  # detach is one more op per call at decode
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n_tokens >= 1, K], got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous")
    return x


def weights(w_raw: np.ndarray, qtype: T, k_dim: int) -> None:
    """uint8 [N, row_bytes] C-contiguous, with rows of exactly K elements of `qtype`."""
    if not isinstance(w_raw, np.ndarray) or w_raw.dtype != np.uint8:
        raise ValueError(f"w_raw must be a uint8 numpy array, got {getattr(w_raw, 'dtype', type(w_raw).__name__)}")
    if w_raw.ndim != 2 or not w_raw.flags.c_contiguous:
        raise ValueError(f"w_raw must be a C-contiguous [N, row_bytes] array, got shape {w_raw.shape}")
    fmt = get_format(qtype)
    if k_dim % fmt.block_size:
        raise ValueError(f"K = {k_dim} is not a multiple of the {qtype.name} block size {fmt.block_size}")
    if w_raw.shape[1] != fmt.row_bytes(k_dim):
        raise ValueError(f"w_raw rows have {w_raw.shape[1]} bytes; K = {k_dim} of {qtype.name} needs "
                         f"{fmt.row_bytes(k_dim)}")


def kernel_type(ggml_type: T | int, supported: tuple[T, ...]) -> T:
    """The type as a GGMLQuantizationType, if it is one of `supported`."""
    qtype = as_qtype(ggml_type)
    if qtype not in supported:
        raise ValueError(f"no CPU kernel for GGML type {qtype.name} (have: {', '.join(q.name for q in supported)})")
    return qtype
