"""Rotary position embeddings: plain, linear and YaRN scaling; half-split or interleaved pairs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..kernels import gpu_kernel_for


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True, slots=True)
class Rope:
    dim: int
    theta: float
    scaling: dict = field(default_factory=dict)  # normalised rope_scaling / rope_parameters; {} means none
    interleaved: bool = False  # DeepSeek: rotate pairs (x0, x1), (x2, x3)...; others: halves
    max_positions: int = 4096

    @property
    def kind(self) -> str:
        return self.scaling.get("rope_type") or self.scaling.get("type") or "default"

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim/2] and the factor that cos/sin are multiplied by."""
        base = self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        kind = self.kind
        if kind == "default":
            return 1.0 / base, 1.0
        if kind == "linear":
            return 1.0 / (base * float(self.scaling["factor"])), 1.0
        if kind != "yarn":
            raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported (use default, linear or yarn)")
        s = self.scaling
        orig = s.get("original_max_position_embeddings") or self.max_positions
        factor = s.get("factor") or self.max_positions / orig
        attn = s.get("attention_factor")
        if attn is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                attn = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
            else:
                attn = yarn_mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return self.dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1 where high-frequency dims keep their original rotation
        inv = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
        return inv, float(attn)


class RopeTables:
    """cos/sin for arbitrary positions, computed on the fly in f32 (positions differ per row in a batch)."""

    def __init__(self, rope: Rope, device: torch.device | str = "cpu"):
        inv, self.attention_factor = rope.inv_freq()
        self.inv_freq = inv.to(device)
        self.interleaved = rope.interleaved

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        if self.attention_factor == 1.0:  # the product would be exact: two ops fewer per decode step
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D/2]. Interleaved input comes out de-interleaved (as in the reference);
    queries and keys get the same permutation, so their dot products are unchanged."""
    fused = gpu_kernel_for(x, "rope", "rope")
    out = fused(x, cos, sin, interleaved) if fused is not None and x.stride(-1) == 1 else None  # one launch
    if out is not None:  # (eager: seven kernels)
        return out
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if c.dtype != x.dtype:
        c, s = c.to(x.dtype), s.to(x.dtype)
    # x1 c - x2 s and x2 c + x1 s, as multiply-adds (five ops: decode runs this twice per layer)
    return torch.cat((torch.addcmul(x1 * c, x2, s, value=-1), torch.addcmul(x2 * c, x1, s)), dim=-1)
