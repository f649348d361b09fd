"""Multi-head latent attention (DeepSeek-V2/V3). The cache holds only the normalised latent [R] and the
roped shared key [P] per token; decode uses the absorbed form and never expands per-head keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import cpu as ck
from .attention import attend
from .cache import Batch, LayerCache
from .norm import RMSNorm
from .quant_linear import QuantLinear
from .rope import apply_rope

# Letters: B rows, T new tokens, L cached tokens, H heads, N nope dim, P rope dim, V value dim, R latent rank.


@dataclass(frozen=True, slots=True)
class MLAShape:
    dim: int
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    scale: float
    bias: bool = False
    eps: float = 1e-6


class MLA(nn.Module):
    def __init__(self, s: MLAShape):
        super().__init__()
        self.s = s
        qk = s.nope_dim + s.rope_dim
        if s.q_lora_rank:
            self.wq_a = nn.Linear(s.dim, s.q_lora_rank, bias=s.bias)
            self.q_norm = RMSNorm(s.q_lora_rank, s.eps)
            self.wq_b = nn.Linear(s.q_lora_rank, s.n_heads * qk, bias=False)
        else:
            self.wq = nn.Linear(s.dim, s.n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(s.dim, s.kv_lora_rank + s.rope_dim, bias=s.bias)
        self.kv_norm = RMSNorm(s.kv_lora_rank, s.eps)
        self.wkv_b = nn.Linear(s.kv_lora_rank, s.n_heads * (s.nope_dim + s.v_dim), bias=False)
        self.wo = nn.Linear(s.n_heads * s.v_dim, s.dim, bias=s.bias)
        self.wq_kv_a: nn.Module | None = None  # wq_a and wkv_a as one layer (see stack_inputs)
        self.absorbed_raw: tuple | None = None  # wkv_b's halves as a GGUF file stores them (see keep_absorbed_raw)
        self._cpu_block: ck.MLABlock | None | bool = False  # the block's decode step in one call (False: not made)

    def stack_inputs(self) -> bool:
        """wq_a and wkv_a (both read x) as one quantized layer: one kernel call at CPU decode, x rounded once. False
        where they do not fit together (no q_lora_rank, other kinds or types)."""
        if self.wq_kv_a is not None or not self.s.q_lora_rank:
            return False
        if not (isinstance(self.wq_a, QuantLinear) and isinstance(self.wkv_a, QuantLinear)):
            return False
        stacked = QuantLinear.stack([self.wq_a, self.wkv_a])
        if stacked is None:
            return False
        self.wq_kv_a, self.wq_a, self.wkv_a = stacked, None, None
        self._cpu_block = False
        return True

    def keep_absorbed_raw(self, k_b, v_b, qtype) -> None:
        """Decode on the CPU reads wkv_b's halves as GGUF's attn_k_b (uint8 [H, R, row bytes]) and attn_v_b ([H, V,
        row bytes]) of `qtype` (kernels.cpu.mla_decode_raw: the same values, fewer bytes); prefill keeps wkv_b."""
        self.absorbed_raw = (k_b, v_b, qtype)
        self._cpu_block = False

    def cpu_block(self) -> "ck.MLABlock | None":
        """The whole block's CPU decode step as one kernel call where its parts allow (wq_a and wkv_a stacked, all
        projections quantized for 8-bit activations without bias, wkv_b's halves as the file's blocks), else None;
        made on first use."""
        if self._cpu_block is False:
            s, parts = self.s, (self.wq_kv_a, getattr(self, "wq_b", None), self.wo)
            fits = (self.absorbed_raw is not None and s.q_lora_rank
                    and all(isinstance(q, QuantLinear) and q.activations == "int8" and q.bias is None for q in parts)
                    and self.q_norm.weight.dtype == self.kv_norm.weight.dtype == torch.float32)
            self._cpu_block = ck.MLABlock(
                self.wq_kv_a.packed, s.q_lora_rank, self.q_norm.weight.detach(), self.q_norm.eps, self.wq_b.packed,
                s.n_heads, s.nope_dim + s.rope_dim, self.kv_norm.weight.detach(), self.kv_norm.eps,
                *self.absorbed_raw, self.wo.packed) if fits else None
        return self._cpu_block

    def cpu_step(self, batch: Batch, cache: LayerCache) -> tuple:
        """The cpu_block's arguments after x, cos and sin for a decode step: the slot's caches, the position, the
        attention scale."""
        return *cache.slot_arrays(batch.slots[0]), batch.start[0], self.s.scale

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q [B, T, H * (N + P)], wkv_a's output [B, T, R + P])."""
        s = self.s
        if self.wq_kv_a is not None:
            q_a, kv = self.wq_kv_a(x).split([s.q_lora_rank, s.kv_lora_rank + s.rope_dim], dim=-1)
            return self.wq_b(self.q_norm(q_a.contiguous())), kv
        q = self.wq_b(self.q_norm(self.wq_a(x))) if s.q_lora_rank else self.wq(x)
        return q, self.wkv_a(x)

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.s.kv_lora_rank,), (self.s.rope_dim,)

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None) -> torch.Tensor:
        s = self.s
        B, T, _ = x.shape
        if batch.one_cpu_token(x, cache) and self.cpu_block() is not None:  # one decode step on the CPU: one call
            return self._cpu_block(x, cos, sin, *self.cpu_step(batch, cache))
        q, kv = self._project(x)
        if (cache is not None and batch.sees_all and x.device.type == "cpu" and x.dtype == torch.float32
                and self.wkv_b.weight.dtype == torch.float32):  # one decode step on the CPU: one kernel call
            slot, norm = batch.slots[0], self.kv_norm
            caches = cache.buffers[0][slot], cache.buffers[1][slot], batch.start[0], s.scale
            if self.absorbed_raw is not None:
                out = ck.mla_decode_raw(q, kv, s.n_heads, norm.weight, norm.eps, cos, sin, *self.absorbed_raw,
                                        *caches)
            else:
                out = ck.mla_decode(q, kv, s.n_heads, norm.weight, norm.eps, cos, sin, self.wkv_b.weight, *caches)
            return self.wo(out.view(B, T, -1))
        q_nope, q_pe = q.view(B, T, s.n_heads, -1).split([s.nope_dim, s.rope_dim], dim=-1)
        latent, k_pe = kv.split([s.kv_lora_rank, s.rope_dim], dim=-1)
        latent = self.kv_norm(latent)  # [B, T, R]
        q_pe = apply_rope(q_pe, cos, sin, True)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, True)[:, :, 0]  # [B, T, P]
        if cache is not None:
            latent, k_pe = cache.update(batch, latent, k_pe)  # [B, L, R], [B, L, P]
        if cache is not None and T == 1:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, batch.mask)
        else:
            out = self._expanded(q_nope, q_pe, latent, k_pe, batch.mask)
        return self.wo(out.reshape(B, T, -1))

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask):
        """Prefill: expand the latent into per-head keys and values, then plain attention."""
        s = self.s
        B, L, _ = latent.shape
        kv = self.wkv_b(latent).view(B, L, s.n_heads, s.nope_dim + s.v_dim)
        k_nope, v = kv.split([s.nope_dim, s.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, L, s.n_heads, s.rope_dim)), dim=-1)  # [B, L, H, N+P]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [B, T, H, N+P]
        return attend(q, k, v, mask, s.scale)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        """Decode: fold wkv_b's key half into the query and its value half into the output, so attention runs
        over the R-dim latent directly."""
        s = self.s
        w = self.wkv_b.weight.view(s.n_heads, s.nope_dim + s.v_dim, s.kv_lora_rank)
        w_uk, w_uv = w[:, :s.nope_dim], w[:, s.nope_dim:]  # [H, N, R], [H, V, R]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,blr->bhtl", q_lat, latent)
                  + torch.einsum("bthp,blp->bhtl", q_pe, k_pe)).float() * s.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)  # [B, H, T, L]
        o_lat = torch.einsum("bhtl,blr->bthr", probs, latent)
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
