"""GGUF names -> ours, as data: tensor names per architecture, and metadata keys -> config.json keys.

Tensor names follow llama.cpp (`blk.{i}.attn_q_a.weight`). Routed experts are stored stacked, one tensor per
projection and layer (`blk.{i}.ffn_gate_exps.weight`, [E, I, D]); they map to `layers.{i}.experts.{gate|up|down}`.
A target ending in `:part` is one piece of a tensor we assemble (MLA's `attn_k_b` + `attn_v_b` -> `wkv_b`).
The pieces here are shared by several families; formats/families.py puts together each family's tables.
"""
from __future__ import annotations

GGUF_COMMON = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.ffn.gate.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.ffn.up.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.ffn.down.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.ffn.router",
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.experts.gate",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.experts.up",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.experts.down",
}

GGUF_MLA = {
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_q_a.weight": "layers.{i}.attn.wq_a.weight",
    "blk.{i}.attn_q_a_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_q_b.weight": "layers.{i}.attn.wq_b.weight",
    "blk.{i}.attn_kv_a_mqa.weight": "layers.{i}.attn.wkv_a.weight",
    "blk.{i}.attn_kv_a_norm.weight": "layers.{i}.attn.kv_norm.weight",
    "blk.{i}.attn_kv_b.weight": "layers.{i}.attn.wkv_b.weight",  # older files: one [H*(N+V), R] tensor
    "blk.{i}.attn_k_b.weight": "layers.{i}.attn.wkv_b.weight:k_b",  # newer files: [H, R, N] ...
    "blk.{i}.attn_v_b.weight": "layers.{i}.attn.wkv_b.weight:v_b",  # ... and [H, V, R]
    "blk.{i}.exp_probs_b.bias": "layers.{i}.ffn.router_bias",
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.ffn.shared.gate.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.ffn.shared.up.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.ffn.shared.down.weight",
}

GGUF_GQA = {
    f"blk.{{i}}.attn_{p}.{w}": f"layers.{{i}}.attn.w{p}.{w}" for p in "qkv" for w in ("weight", "bias")
} | {
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
}

# Tensors a file may carry that we do not use: llama-3 rope factors, and multi-token-prediction heads.
GGUF_IGNORED = (r"rope_freqs\.weight", r"blk\.\d+\.nextn\..*")

# Metadata `{arch}.<key>` -> config.json key: the keys every architecture has.
SHARED_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "expert_count": "n_routed_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}

# llama.cpp's `expert_gating_func` values
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}
