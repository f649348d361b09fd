"""Mixtral: GQA attention and a softmax top-2 router over 8 experts in every layer; no shared expert."""
from __future__ import annotations

from dataclasses import dataclass

from ..layers.attention import GQAttention
from ..layers.moe import RouterSpec
from ..layers.rope import Rope
from ..formats.families import MIXTRAL
from .common import Block, MoE, Transformer, check_act, need, rope_from_config

NAMES = MIXTRAL  # its registration: HF and GGUF names, metadata keys


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    moe_inter_dim: int
    n_routed_experts: int
    router: RouterSpec
    rope: Rope
    eps: float
    tie_embeddings: bool
    sliding_window: int | None

    @staticmethod
    def from_config(cfg: dict) -> "ModelArgs":
        check_act(cfg)
        dim, n_heads = need(cfg, "hidden_size"), need(cfg, "num_attention_heads")
        head_dim = cfg.get("head_dim") or dim // n_heads
        n_experts = need(cfg, "num_local_experts", "num_experts")
        return ModelArgs(
            model_type="mixtral", vocab_size=need(cfg, "vocab_size"), dim=dim, n_layers=need(cfg, "num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            moe_inter_dim=need(cfg, "intermediate_size"), n_routed_experts=n_experts,
            # Mixtral renormalises the top-k softmax weights: the same as a softmax over the chosen logits.
            router=RouterSpec(n_experts=n_experts, top_k=need(cfg, "num_experts_per_tok"), norm_topk_prob=True),
            rope=rope_from_config(cfg, head_dim, interleaved=False), eps=cfg.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), sliding_window=cfg.get("sliding_window"))

    def is_moe(self, i: int) -> bool:
        return True

    @property
    def expert_shape(self) -> tuple[int, int]:
        return self.moe_inter_dim, self.dim


def build(a: ModelArgs) -> Transformer:
    blocks = [Block(GQAttention(a.dim, a.n_heads, a.n_kv_heads, a.head_dim), MoE(a.dim, a.router), a.dim, a.eps)
              for _ in range(a.n_layers)]
    return Transformer(a.vocab_size, a.dim, a.eps, blocks, a.rope, a.tie_embeddings)
