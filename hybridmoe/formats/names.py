"""HF tensor names -> ours, as data. `{i}` is a layer index and `{e}` an expert index. The pieces here are shared by
several families; formats/families.py puts together each family's table.

Our names follow the module tree of models/common.py; routed experts are `layers.{i}.experts.{e}.{gate|up|down}`
and are handed to an Experts object rather than to the module tree.
"""
from __future__ import annotations

import re

HF_COMMON = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attn.wo.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.ffn.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.ffn.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.ffn.down.weight",
}

HF_MLA = {
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.q_a_proj.weight": "layers.{i}.attn.wq_a.weight",
    "model.layers.{i}.self_attn.q_a_proj.bias": "layers.{i}.attn.wq_a.bias",
    "model.layers.{i}.self_attn.q_a_layernorm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.q_b_proj.weight": "layers.{i}.attn.wq_b.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight": "layers.{i}.attn.wkv_a.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias": "layers.{i}.attn.wkv_a.bias",
    "model.layers.{i}.self_attn.kv_a_layernorm.weight": "layers.{i}.attn.kv_norm.weight",
    "model.layers.{i}.self_attn.kv_b_proj.weight": "layers.{i}.attn.wkv_b.weight",
}

HF_GQA = {
    f"model.layers.{{i}}.self_attn.{p}_proj.{w}": f"layers.{{i}}.attn.w{p}.{w}"
    for p in "qkv" for w in ("weight", "bias")
} | {
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}

_HF_EXPERTS = {f"model.layers.{{i}}.mlp.experts.{{e}}.{p}_proj.weight": f"layers.{{i}}.experts.{{e}}.{p}"
               for p in ("gate", "up", "down")}

HF_DEEPSEEK_MOE = _HF_EXPERTS | {
    "model.layers.{i}.mlp.gate.weight": "layers.{i}.ffn.router",
    "model.layers.{i}.mlp.gate.e_score_correction_bias": "layers.{i}.ffn.router_bias",
} | {f"model.layers.{{i}}.mlp.shared_experts.{p}_proj.weight": f"layers.{{i}}.ffn.shared.{p}.weight"
     for p in ("gate", "up", "down")}

HF_QWEN_MOE = _HF_EXPERTS | {
    "model.layers.{i}.mlp.gate.weight": "layers.{i}.ffn.router",
    "model.layers.{i}.mlp.shared_expert_gate.weight": "layers.{i}.ffn.shared_gate.weight",
} | {f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight": f"layers.{{i}}.ffn.shared.{p}.weight"
     for p in ("gate", "up", "down")}

HF_MIXTRAL_MOE = {
    "model.layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.ffn.router",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "layers.{i}.experts.{e}.gate",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "layers.{i}.experts.{e}.up",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "layers.{i}.experts.{e}.down",
}

# Buffers some checkpoints carry that hold nothing we need.
HF_IGNORED = (r".*\.rotary_emb\.inv_freq",)


class NameMap:
    """Compiled form of one table: source name -> (our name, layer index or None)."""

    def __init__(self, table: dict[str, str], ignored: tuple[str, ...] = HF_IGNORED):
        self._rules = []
        for src, dst in table.items():
            pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
            self._rules.append((re.compile(pattern + "$"), dst))
        self._ignored = [re.compile(p + "$") for p in ignored]

    def ignored(self, name: str) -> bool:
        return any(p.match(name) for p in self._ignored)

    def __call__(self, name: str) -> tuple[str, int | None] | None:
        for pattern, dst in self._rules:
            m = pattern.match(name)
            if m:
                groups = m.groupdict()
                layer = int(groups["i"]) if "i" in groups else None
                return dst.format(**groups), layer
        return None
