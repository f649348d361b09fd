"""The CPU decode blocks (`blocks.py`) as objects that check their weights once and then take a step per call: an
attention block (MLABlock for DeepSeek, GQABlock for Qwen and Mixtral), the same between its block's residual adds
and norms (AttentionHalf), and a MoE layer (MoEBlock)."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from . import blocks as kernels
from .api import _NO_ROWS, _absorbed_raw, _expert_shapes, _f32_contiguous, _mla_caches, _raw_experts, routing_args
from .checks import activations
from .raw import KIND, W32
from .repack import PackedWeight


def _stacked(w: PackedWeight) -> tuple:
    """A repacked weight as the kernels' one-expert stack: (kind, q, s, d each [1, tiles, ...])."""
    return (KIND[w.qtype], *(a[None] for a in w.arrays))


class _AttentionBlock:
    """What MLABlock and GQABlock share: a step is `kernel(x, *args(...), out)`; `half_kernel` is the same between
    the block's norms (AttentionHalf)."""

    dim: int
    kernel = half_kernel = None

    def split_args(self) -> tuple[tuple, tuple, tuple]:
        """The kernel's fixed arguments (a, b, c) around the per-step ones: x, *a, cos, sin, *b, cache_a, cache_b,
        pos, scale, *c, out."""
        raise NotImplementedError

    def checked(self, cos, sin, cache_a, cache_b, pos: int) -> tuple:
        """cos, sin and the slot's caches checked against the block's shapes and pos -> (cos, sin, cache_a,
        cache_b) as the kernel takes them."""
        raise NotImplementedError

    def args(self, cos, sin, cache_a, cache_b, pos: int, scale: float) -> tuple:
        """The kernel's arguments between x and out for a step: cos, sin and the slot's caches (written at pos)."""
        head, mid, tail = self.split_args()
        cos, sin, cache_a, cache_b = self.checked(cos, sin, cache_a, cache_b, pos)
        return (*head, cos, sin, *mid, cache_a, cache_b, pos, np.float32(scale), *tail)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_a: torch.Tensor,
                 cache_b: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
        """x [1, 1, D] float32 (the normed hidden state); cos, sin and the slot's caches as `args` takes them, written
        at pos -> [1, 1, D]."""
        out = np.empty((1, self.dim), dtype=np.float32)
        self.kernel(activations(x.reshape(1, self.dim)), *self.args(cos, sin, cache_a, cache_b, pos, scale), out)
        return torch.from_numpy(out).view(1, 1, self.dim)


class MLABlock(_AttentionBlock):
    """A DeepSeek attention block's decode step in one kernel call (`blocks.py`): x [1, D] -> wq_kv_a (wq_a and
    wkv_a stacked), q_norm, wq_b, absorbed attention over the slot's cache (wkv_b as GGUF's attn_k_b / attn_v_b of
    `raw_type`), wo -> [1, D]; the bits of those calls one by one (gemv_packed, rms_norm, mla_decode_raw,
    gemv_packed). The projections are repacked for 8-bit activations; everything is checked here, once."""

    kernel, half_kernel = staticmethod(kernels.mla_block), staticmethod(kernels.mla_half)

    def __init__(self, wq_kv_a: PackedWeight, q_rank: int, q_norm: torch.Tensor, q_eps: float, wq_b: PackedWeight,
                 n_heads: int, qk: int, kv_norm: torch.Tensor, kv_eps: float, k_b: np.ndarray, v_b: np.ndarray,
                 raw_type: T | int, wo: PackedWeight):
        rank = kv_norm.numel()
        if any(w.activations != "int8" for w in (wq_kv_a, wq_b, wo)):
            raise ValueError("the block's projections must be repacked for 8-bit activations")
        v_dim = v_b.shape[1] if isinstance(v_b, np.ndarray) and v_b.ndim == 3 else 0
        if (wq_b.n_cols != q_rank or wq_b.n_rows != n_heads * qk or wq_kv_a.n_rows <= q_rank + rank
                or wo.n_cols != n_heads * v_dim or wq_kv_a.n_cols != wo.n_rows):
            raise ValueError(f"projections do not fit: wq_kv_a {wq_kv_a.n_rows}x{wq_kv_a.n_cols}, wq_b "
                             f"{wq_b.n_rows}x{wq_b.n_cols}, wo {wo.n_rows}x{wo.n_cols} for {n_heads} heads of "
                             f"{qk}, q rank {q_rank}, latent rank {rank}, values {v_dim}")
        self.rope = wq_kv_a.n_rows - q_rank - rank
        self.dims = (n_heads, qk, rank, self.rope)
        self.dim = wo.n_rows

        self.head = (*_stacked(wq_kv_a), q_rank, _f32_contiguous("q_norm", q_norm, (q_rank,)), np.float32(q_eps),
                     *_stacked(wq_b), n_heads, qk, _f32_contiguous("kv_norm", kv_norm, (rank,)), np.float32(kv_eps))
        self.raw = (KIND[_absorbed_raw(k_b, v_b, raw_type, n_heads, rank, qk - self.rope)], k_b, v_b)
        self.tail = _stacked(wo)

    def checked(self, cos, sin, latent_cache, pe_cache, pos: int) -> tuple:
        """cos, sin [P/2]; the slot's caches [max_len, R] and [max_len, P]."""
        n_heads, qk, rank, rope = self.dims
        dims = (latent_cache.shape[0], rank, rope, qk - rope)
        if not 0 <= pos < dims[0]:
            raise ValueError(f"position {pos} is outside a cache of {dims[0]}")
        return (_f32_contiguous("cos", cos, (rope // 2,), reshape=True),
                _f32_contiguous("sin", sin, (rope // 2,), reshape=True), *_mla_caches(latent_cache, pe_cache, dims))

    def split_args(self) -> tuple[tuple, tuple, tuple]:
        return self.head, self.raw, (W32, *self.tail)


class GQABlock(_AttentionBlock):
    """A grouped-query attention block's decode step in one kernel call (`blocks.py`): x [1, D] -> wqkv (q, k, v
    stacked), the optional q/k norms, rope, the slot's cache, attention, wo -> [1, D]; the bits of those calls one
    by one (gemv_packed, gqa_decode, gemv_packed). The projections are repacked for 8-bit activations; everything
    is checked here, once."""

    kernel, half_kernel = staticmethod(kernels.gqa_block), staticmethod(kernels.gqa_half)

    def __init__(self, wqkv: PackedWeight, n_heads: int, n_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, eps: float, wo: PackedWeight):
        width = (n_heads + 2 * n_kv_heads) * head_dim
        if any(w.activations != "int8" for w in (wqkv, wo)):
            raise ValueError("the block's projections must be repacked for 8-bit activations")
        if (n_kv_heads < 1 or n_heads % n_kv_heads or head_dim % 2 or wqkv.n_rows != width
                or wo.n_cols != n_heads * head_dim or wo.n_rows != wqkv.n_cols):
            raise ValueError(f"projections do not fit: wqkv {wqkv.n_rows}x{wqkv.n_cols}, wo {wo.n_rows}x{wo.n_cols} "
                             f"for {n_heads} query and {n_kv_heads} kv heads of {head_dim}")
        self.dim, self.dims = wo.n_rows, (n_heads, n_kv_heads, head_dim)
        self.head = (*_stacked(wqkv), n_heads, width, _f32_contiguous("q_norm", q_norm, (head_dim,)),
                     _f32_contiguous("k_norm", k_norm, (head_dim,)), np.float32(eps))
        self.tail = _stacked(wo)

    def checked(self, cos, sin, k_cache, v_cache, pos: int) -> tuple:
        """cos, sin [head dim / 2]; the slot's caches [max_len, Hk, head dim]."""
        _, n_kv, head_dim = self.dims
        cache_shape = (k_cache.shape[0], n_kv, head_dim)
        if not 0 <= pos < cache_shape[0]:
            raise ValueError(f"position {pos} is outside a cache of {cache_shape[0]}")
        return (_f32_contiguous("cos", cos, (head_dim // 2,), reshape=True),
                _f32_contiguous("sin", sin, (head_dim // 2,), reshape=True),
                _f32_contiguous("k_cache", k_cache, cache_shape), _f32_contiguous("v_cache", v_cache, cache_shape))

    def split_args(self) -> tuple[tuple, tuple, tuple]:
        return self.head, (), self.tail


class AttentionHalf:
    """A decoder block's attention half of one decode token in one kernel call (`Block.attend`): the previous
    block's pending output added to x, the attention norm, the attention block (MLABlock or GQABlock), its output
    added, the feed-forward norm; the bits of those calls one by one. Norm weights f32 [D], checked once."""

    def __init__(self, block: _AttentionBlock, attn_norm: torch.Tensor, attn_eps: float, ffn_norm: torch.Tensor,
                 ffn_eps: float):
        self.block = block
        self.norms = (_f32_contiguous("attn_norm", attn_norm, (block.dim,)), np.float32(attn_eps),
                      _f32_contiguous("ffn_norm", ffn_norm, (block.dim,)), np.float32(ffn_eps))

    def __call__(self, x: torch.Tensor, pending: torch.Tensor | None, cos, sin, cache_a, cache_b, pos: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x [1, 1, D] float32 (the residual stream), pending the same or None; the rest as the block takes them ->
        (x plus pending plus the attention's output, its feed-forward norm), each [1, 1, D]."""
        block = self.block
        dim = block.dim
        xa = activations(x.reshape(1, dim))
        pa = _NO_ROWS if pending is None else activations(pending.reshape(1, dim))
        x_out, h = np.empty((1, dim), dtype=np.float32), np.empty((1, dim), dtype=np.float32)
        block.half_kernel(xa, pa, *self.norms, x_out, h, *block.args(cos, sin, cache_a, cache_b, pos, scale))
        return torch.from_numpy(x_out).view(1, 1, dim), torch.from_numpy(h).view(1, 1, dim)


class MoEBlock:
    """A MoE layer's decode step for one token in one kernel call (`blocks.py`): route_topk's routing, the chosen
    experts from the file's bytes with 8-bit activations and their weighted sum (ffn_raw_int8's), plus the shared
    expert from its 8-bit repacked tiles (ffn_experts'), added: the bits of those calls one by one. Checked once.
    shared: the shared expert's gate, up, down (PackedExperts of one expert, 8-bit activations), or None; the
    routing settings are route_topk's."""

    def __init__(self, router: torch.Tensor, gate: np.ndarray, up: np.ndarray, down: np.ndarray, types: tuple,
                 shared: tuple | None, *, top_k: int, renorm: bool, scaling: float, sigmoid: bool = False,
                 bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, top2_groups: bool = False,
                 masked: float = 0.0):
        dim = down.shape[1] if isinstance(down, np.ndarray) and down.ndim == 3 else 0
        probe = torch.zeros(1, dim)
        _, _, kinds = _raw_experts(probe, gate, up, down, types, [0])
        self.dim, self.top_k = dim, top_k
        self.routing = routing_args(router, dim, top_k, renorm, scaling, sigmoid, bias, n_group, topk_group,
                                    top2_groups, masked)
        self.routed = (kinds, gate, up, down)
        self.shared = ()
        if shared is not None:
            s_gate, s_up, s_down = shared
            _expert_shapes(probe.numpy(), s_gate, s_up, s_down)
            if s_gate.activations != "int8" or s_down.n_rows != dim:
                raise ValueError("the shared expert must be repacked for 8-bit activations, with D output rows")
            self.shared = (np.array([KIND[s_gate.qtype], KIND[s_up.qtype], KIND[s_down.qtype]], dtype=np.int64),
                           s_gate.n_rows, s_down.arrays[0].shape[-2] * s_down.lanes,
                           *s_gate.arrays, *s_up.arrays, *s_down.arrays)
        self.kernel = kernels.moe_block_shared if shared is not None else kernels.moe_block

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """x [1, D] float32 (the normed hidden state) -> (the layer's output [1, D], the chosen experts)."""
        xa = activations(x)
        if xa.shape != (1, self.dim):
            raise ValueError(f"x must be one row of {self.dim}, got {list(xa.shape)}")
        ids = np.empty((1, self.top_k), dtype=np.int64)
        weights = np.empty((1, self.top_k), dtype=np.float32)
        out = np.empty((1, self.dim), dtype=np.float32)
        self.kernel(xa, *self.routing, *self.routed, *self.shared, ids, weights, out)
        return torch.from_numpy(out), ids[0].tolist()
