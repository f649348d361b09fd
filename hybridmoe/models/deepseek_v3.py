"""DeepSeek-V3 / R1, and DeepSeek-V2 (model_type deepseek_v2): MLA attention, dense first layers, shared experts,
group-limited routing (sigmoid + correction bias for V3, softmax for V2)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..layers.mla import MLA, MLAShape
from ..layers.mlp import MLP
from ..layers.moe import RouterSpec
from ..layers.rope import Rope, yarn_mscale
from ..formats.families import DEEPSEEK_V3
from .common import Block, MoE, Transformer, check_act, need, rope_from_config

NAMES = DEEPSEEK_V3  # its registration: HF and GGUF names, metadata keys


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    inter_dim: int
    moe_inter_dim: int
    n_routed_experts: int
    n_shared_experts: int
    first_k_dense: int
    moe_layer_freq: int
    router: RouterSpec | None
    mla: MLAShape
    rope: Rope
    eps: float
    tie_embeddings: bool
    fp8_block: tuple[int, int] | None  # set when the checkpoint stores FP8 weights with block scales

    @staticmethod
    def from_config(cfg: dict) -> "ModelArgs":
        check_act(cfg)
        mt = cfg.get("model_type")
        v3 = mt == "deepseek_v3"
        n_heads = need(cfg, "num_attention_heads")
        nope, rope_dim = need(cfg, "qk_nope_head_dim"), need(cfg, "qk_rope_head_dim")
        rope = rope_from_config(cfg, rope_dim, interleaved=cfg.get("rope_interleave", True))
        scale = (nope + rope_dim) ** -0.5
        if rope.kind != "default" and rope.scaling.get("mscale_all_dim"):
            m = yarn_mscale(rope.scaling["factor"], rope.scaling["mscale_all_dim"])
            scale *= m * m
        n_experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0
        router = None
        if n_experts:
            method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
            method = "greedy" if method == "gready" else method  # spelling in early V2 configs
            router = RouterSpec(
                n_experts=n_experts, top_k=need(cfg, "num_experts_per_tok"),
                scoring=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"), method=method,
                n_group=cfg.get("n_group") or 1, topk_group=cfg.get("topk_group") or 1,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
                scaling=float(cfg.get("routed_scaling_factor") or 1.0), scale_after_norm=v3)
        q = cfg.get("quantization_config") or {}
        fp8 = None
        if q:
            if q.get("quant_method") != "fp8":
                raise ConfigError(f"config.json: quantization_config.quant_method {q.get('quant_method')!r} "
                                  "is not supported (fp8 block-scaled only)")
            fp8 = tuple(q.get("weight_block_size") or (128, 128))
        mla = MLAShape(dim=need(cfg, "hidden_size"), n_heads=n_heads, q_lora_rank=cfg.get("q_lora_rank"),
                       kv_lora_rank=need(cfg, "kv_lora_rank"), nope_dim=nope, rope_dim=rope_dim,
                       v_dim=need(cfg, "v_head_dim"), scale=scale, bias=bool(cfg.get("attention_bias", False)),
                       eps=cfg.get("rms_norm_eps", 1e-6))
        return ModelArgs(
            model_type=mt, vocab_size=need(cfg, "vocab_size"), dim=mla.dim, n_layers=need(cfg, "num_hidden_layers"),
            n_heads=n_heads, inter_dim=need(cfg, "intermediate_size"),
            moe_inter_dim=cfg.get("moe_intermediate_size") or 0, n_routed_experts=n_experts,
            n_shared_experts=cfg.get("n_shared_experts") or 0, first_k_dense=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1, router=router, mla=mla, rope=rope, eps=mla.eps,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), fp8_block=fp8)

    def is_moe(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense and i % self.moe_layer_freq == 0

    @property
    def expert_shape(self) -> tuple[int, int]:
        return self.moe_inter_dim, self.dim


def build(a: ModelArgs) -> Transformer:
    blocks = []
    for i in range(a.n_layers):
        if a.is_moe(i):
            ffn = MoE(a.dim, a.router, a.moe_inter_dim * a.n_shared_experts, router_bias=a.router.method == "noaux_tc")
        else:
            ffn = MLP(a.dim, a.inter_dim)
        blocks.append(Block(MLA(a.mla), ffn, a.dim, a.eps))
    return Transformer(a.vocab_size, a.dim, a.eps, blocks, a.rope, a.tie_embeddings)
