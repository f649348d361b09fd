"""Typed wrappers: check device, dtype, contiguity, shapes and block alignment, then launch the Triton kernels."""
from __future__ import annotations

from typing import Sequence

import torch
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import get_format

from . import checks, decode, dequant


def gemv(x: torch.Tensor, w: torch.Tensor, ggml_type: T | int, *, ids: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: dict | None = None) -> torch.Tensor:
    """Decode GEMV from raw GGUF rows, accumulating in float32.

    Plain:   x [n, K] (n <= 8), w uint8 [N, row_bytes]            -> y [n, N] = x @ W.T
    Grouped: w uint8 [E, N, row_bytes] stacked, ids [G] int       -> y [G, n, N], y[g] = x_g @ W[ids[g]].T,
             with x [n, K] shared by all g or x [G, n, K]; one launch for all G matrices.
    out_dtype defaults to x's dtype. `config` ({R, BB, num_warps}) overrides the tile choice (benchmarks).
    """
    qtype = checks.kernel_type(ggml_type)
    grouped = ids is not None
    k_dim = checks.raw_weight("w", w, qtype, ndim=3 if grouped else 2)
    device = checks.device_of("w", w)
    checks.device_of("x", x, device)
    if grouped:
        checks.slot_ids(ids, w.shape[0], device)
        n_mats = ids.shape[0]
        if x.dim() == 3:
            if x.shape[0] != n_mats:
                raise ValueError(f"x has {x.shape[0]} rows of activations for {n_mats} ids")
            checks.activations(x[0], k_dim)
            checks.contiguous("x", x)
            x3 = x
        else:
            x3 = checks.activations(x, k_dim).expand(n_mats, -1, -1)  # stride 0: every matrix reads the same x
    else:
        n_mats = 1
        x3 = checks.activations(x, k_dim)[None]
    n_rows, n_tok = w.shape[-2], x3.shape[1]
    y = torch.empty(n_mats, n_tok, n_rows, dtype=checks.out_dtype(out_dtype, x.dtype), device=device)
    stride_we = w.stride(0) if grouped else 0
    decode.launch(x3, w, y, int(qtype), n_rows=n_rows, k_dim=k_dim, stride_we=stride_we, ids=ids,
                  config=config)
    return y if grouped else y[0]


def dequantize(raw: torch.Tensor, ggml_type: T | int, shape: Sequence[int],
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Raw GGUF bytes (uint8, contiguous, any shape) of a tensor of logical `shape` -> `dtype` tensor of `shape`.

    float32 output is bit-exact with `hybridmoe.quant.dequantize`; bfloat16 / float16 are its rounding.
    """
    qtype = checks.kernel_type(ggml_type)
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] <= 0 or shape[-1] % fmt.block_size:
        raise ValueError(f"{qtype.name}: last dim of {shape} is not a positive multiple of block size "
                         f"{fmt.block_size}")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    if n_rows <= 0:
        raise ValueError(f"shape {shape} is empty")
    device = checks.device_of("raw", raw)
    checks.contiguous("raw", raw)
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw must hold GGUF bytes as uint8, got {raw.dtype}")
    need = n_rows * fmt.row_bytes(shape[-1])
    if raw.numel() != need:
        raise ValueError(f"{qtype.name}: {raw.numel()} bytes given, shape {shape} needs {need}")
    w = raw.view(n_rows, -1)
    checks.raw_weight("raw", w, qtype, shape[-1])
    out = torch.empty(n_rows, shape[-1], dtype=checks.out_dtype(dtype, dtype), device=device)
    dequant.launch(w, out, int(qtype))
    return out.view(shape)


def matmul(x: torch.Tensor, w: torch.Tensor, ggml_type: T | int) -> torch.Tensor:
    """Prefill: x [T, K] @ W.T with W uint8 [N, row_bytes] dequantized to x's dtype first -> [T, N]."""
    qtype = checks.kernel_type(ggml_type)
    k_dim = checks.raw_weight("w", w, qtype)
    checks.activations(x, k_dim, max_tokens=None)
    return x @ dequantize(w, qtype, (w.shape[0], k_dim), dtype=x.dtype).T
