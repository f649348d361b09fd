"""DeepSeek's native FP8 checkpoints: e4m3 weights with one f32 `weight_scale_inv` per 128x128 block."""
from __future__ import annotations

import torch

from ..errors import ModelFileError


def dequant_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype,
                       block: tuple[int, int] = (128, 128), name: str = "weight") -> torch.Tensor:
    """w[i, j] = fp8[i, j] * scale_inv[i // bo, j // bi], computed in f32; ragged edge blocks are allowed."""
    rows, cols = weight.shape
    bo, bi = block
    want = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != want:
        raise ModelFileError(f"{name}_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} "
                             f"for a {rows}x{cols} weight in {bo}x{bi} blocks")
    ro, ri = want
    w = torch.zeros(ro * bo, ri * bi, dtype=torch.float32)
    w[:rows, :cols] = weight.float()
    w = w.view(ro, bo, ri, bi) * scale_inv.float()[:, None, :, None]  # [RO, BO, RI, BI]
    return w.view(ro * bo, ri * bi)[:rows, :cols].to(out_dtype)
