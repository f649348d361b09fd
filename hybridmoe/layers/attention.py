"""Grouped-query attention (Qwen, Mixtral) over a per-slot K/V cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as ck
from .cache import Batch, LayerCache
from .norm import RMSNorm
from .gpu_quant_linear import GpuQuantLinear
from .quant_linear import QuantLinear
from .rope import apply_rope


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, T, H, Dq], k [B, L, Hk, Dq], v [B, L, Hk, Dv], mask [B, 1, T, L] -> [B, T, H, Dv].
    Kv heads are shared by H/Hk query heads each."""
    # enable_gqa lets each kv head serve its query heads without copying the cache H/Hk times
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class GQAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 qk_norm: bool = False, eps: float = 1e-6, interleaved_rope: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.interleaved = interleaved_rope
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.wqkv: nn.Module | None = None  # q, k and v as one layer (see stack_qkv)
        self._cpu_block: ck.GQABlock | None | bool = False  # the block's decode step in one call (False: not made)

    def stack_qkv(self) -> bool:
        """q, k and v as one layer whose output is theirs concatenated: one kernel call (CPU, quantized layers) or
        one matrix product (GPU, plain layers) instead of three; the separate layers are dropped. False where they
        do not fit together (other kinds, types, devices or dtypes)."""
        projs = [self.wq, self.wk, self.wv]
        if self.wqkv is not None:
            return False
        if all(isinstance(p, QuantLinear) for p in projs):
            stacked = QuantLinear.stack(projs)
        elif all(isinstance(p, GpuQuantLinear) for p in projs):
            stacked = GpuQuantLinear.stack(projs)
        elif all(type(p) is nn.Linear for p in projs):
            stacked = _stacked_linear(projs)
        else:
            stacked = None
        if stacked is None:
            return False
        self.wqkv, self.wq, self.wk, self.wv = stacked, None, None, None
        self._cpu_block = False
        return True

    def cpu_block(self) -> "ck.GQABlock | None":
        """The whole block's CPU decode step as one kernel call where its parts allow (q, k, v stacked, projections
        quantized for 8-bit activations without bias, half-split rope), else None; made on first use."""
        if self._cpu_block is False:
            parts, norms = (self.wqkv, self.wo), (self.q_norm, self.k_norm)
            fits = (not self.interleaved and all(isinstance(q, QuantLinear) and q.activations == "int8"
                                                 and q.bias is None for q in parts)
                    and all(n is None or n.weight.dtype == torch.float32 for n in norms))
            weights = [None if n is None else n.weight.detach() for n in norms]
            self._cpu_block = ck.GQABlock(self.wqkv.packed, self.n_heads, self.n_kv_heads, self.head_dim, *weights,
                                          0.0 if self.q_norm is None else self.q_norm.eps,
                                          self.wo.packed) if fits else None
        return self._cpu_block

    def cpu_step(self, batch: Batch, cache: LayerCache) -> tuple:
        """The cpu_block's arguments after x, cos and sin for a decode step: the slot's caches, the position, the
        attention scale."""
        return *cache.slot_arrays(batch.slots[0]), batch.start[0], self.head_dim ** -0.5

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if batch.one_cpu_token(x, cache) and self.cpu_block() is not None:  # one decode step on the CPU: one call
            return self._cpu_block(x, cos, sin, *self.cpu_step(batch, cache))
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.wqkv(x) if self.wqkv is not None else None
        if (cache is not None and batch.sees_all and x.device.type == "cpu" and x.dtype == torch.float32
                and not self.interleaved):  # one decode step on the CPU: one kernel call after the projections
            if qkv is None:
                qkv = torch.cat((self.wq(x), self.wk(x), self.wv(x)), dim=-1)
            return self.wo(self._decode_cpu(qkv, batch, cos, sin, cache).view(B, T, q_width))
        if qkv is not None:
            q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm.then_rope(q, cos, sin, self.interleaved)
            k = self.k_norm.then_rope(k, cos, sin, self.interleaved)
        else:
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        if cache is not None:
            k, v = cache.update(batch, k, v)  # [B, L, Hk, D]
        out = attend(q, k, v, batch.mask, self.head_dim ** -0.5)
        return self.wo(out.reshape(B, T, -1))

    def _decode_cpu(self, qkv: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor,
                    cache: LayerCache) -> torch.Tensor:
        """The same as the general path for one row's one token that sees its whole history (kernels.cpu)."""
        slot = batch.slots[0]
        norms = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        eps = 0.0 if self.q_norm is None else self.q_norm.eps
        return ck.gqa_decode(qkv, self.n_heads, *norms, eps, cos, sin,
                             cache.buffers[0][slot], cache.buffers[1][slot], batch.start[0], self.head_dim ** -0.5)


def _stacked_linear(layers: list[nn.Linear]) -> nn.Linear | None:
    """One nn.Linear whose weight (and bias) is the layers' stacked; None unless they share device, dtype and bias."""
    if len({(p.weight.device, p.weight.dtype, p.bias is None) for p in layers}) != 1:
        return None
    first = layers[0].weight
    stacked = nn.Linear(first.shape[1], sum(p.out_features for p in layers), bias=layers[0].bias is not None,
                        device=first.device, dtype=first.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([p.weight for p in layers]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([p.bias for p in layers]))
    return stacked.requires_grad_(False)


def stack_qkv_projections(model: nn.Module) -> None:
    """GQAttention.stack_qkv for every attention layer of the model that it applies to."""
    for module in model.modules():
        if isinstance(module, GQAttention):
            module.stack_qkv()
