"""Qwen3-MoE (and Qwen2-MoE: qkv bias, a gated shared expert): GQA attention, softmax top-k routing."""
from __future__ import annotations

from dataclasses import dataclass

from ..layers.attention import GQAttention
from ..layers.mlp import MLP
from ..layers.moe import RouterSpec
from ..layers.rope import Rope
from ..formats.families import QWEN3_MOE
from .common import Block, MoE, Transformer, check_act, need, rope_from_config

NAMES = QWEN3_MOE  # its registration: HF and GGUF names, metadata keys


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter_dim: int
    moe_inter_dim: int
    n_routed_experts: int
    shared_inter_dim: int
    sparse_step: int
    mlp_only_layers: tuple[int, ...]
    router: RouterSpec
    qkv_bias: bool
    qk_norm: bool
    rope: Rope
    eps: float
    tie_embeddings: bool

    @staticmethod
    def from_config(cfg: dict) -> "ModelArgs":
        check_act(cfg)
        qwen2 = cfg.get("model_type") == "qwen2_moe"
        dim, n_heads = need(cfg, "hidden_size"), need(cfg, "num_attention_heads")
        head_dim = cfg.get("head_dim") or dim // n_heads
        n_experts = need(cfg, "num_experts", "num_local_experts")
        return ModelArgs(
            model_type=cfg["model_type"], vocab_size=need(cfg, "vocab_size"), dim=dim,
            n_layers=need(cfg, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            inter_dim=need(cfg, "intermediate_size"), moe_inter_dim=need(cfg, "moe_intermediate_size"),
            n_routed_experts=n_experts,
            shared_inter_dim=(cfg.get("shared_expert_intermediate_size") or 0) if qwen2 else 0,
            sparse_step=cfg.get("decoder_sparse_step") or 1, mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            router=RouterSpec(n_experts=n_experts, top_k=need(cfg, "num_experts_per_tok"),
                              norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
            qkv_bias=bool(cfg.get("qkv_bias", True)) if qwen2 else bool(cfg.get("attention_bias", False)),
            qk_norm=not qwen2, rope=rope_from_config(cfg, head_dim, interleaved=False),
            eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    def is_moe(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.sparse_step == 0

    @property
    def expert_shape(self) -> tuple[int, int]:
        return self.moe_inter_dim, self.dim


def build(a: ModelArgs) -> Transformer:
    blocks = []
    for i in range(a.n_layers):
        attn = GQAttention(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, qkv_bias=a.qkv_bias, qk_norm=a.qk_norm,
                           eps=a.eps)
        if a.is_moe(i):
            ffn = MoE(a.dim, a.router, a.shared_inter_dim, shared_gate=bool(a.shared_inter_dim))
        else:
            ffn = MLP(a.dim, a.inter_dim)
        blocks.append(Block(attn, ffn, a.dim, a.eps))
    return Transformer(a.vocab_size, a.dim, a.eps, blocks, a.rope, a.tie_embeddings)
