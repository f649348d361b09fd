"""Random tiny checkpoints built with transformers' own classes, plus a small BPE tokenizer built with tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384
CORPUS = """The quick brown fox jumps over the lazy dog. Mixture of experts models route each token to a few experts.
A router picks the experts; the shared expert always runs. Attention reads the cache of earlier tokens.
def add(a, b): return a + b. Lists, tuples and dictionaries are built-in types in Python.
Hello world! How are you today? I am fine, thank you. What does json.dumps do? It serialises an object.
""" * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
R1_TEMPLATE = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|><think>\n{% endif %}")


def write_tokenizer(out: Path, template: str = CHAT_TEMPLATE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin|>", "eos_token": "<|end|>", "add_bos_token": True, "chat_template": template}))


def _save(model, out: Path, template: str = CHAT_TEMPLATE) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_tokenizer(out, template)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(bos_token_id=0, eos_token_id=1)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out


def _randomize(model, std: float = 0.08) -> None:
    """Larger-than-default weights so routing and attention are decisive (no near-ties between experts)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _build(config_cls, model_cls, kw: dict, out: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A seeded random model of transformers' own class, saved as an HF directory with a tokenizer."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw))
    _randomize(model)
    return _save(model, out, template)


def deepseek_v3(out: Path, template: str = CHAT_TEMPLATE, **over) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
              n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
              kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
              routed_scaling_factor=2.5, max_position_embeddings=512,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                            "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1})
    return _build(DeepseekV3Config, DeepseekV3ForCausalLM, kw | over, out, template)


def deepseek_v2(out: Path, **over) -> Path:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, topk_method="greedy", n_group=1,
              topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=512)
    return _build(DeepseekV2Config, DeepseekV2ForCausalLM, kw | over, out)


def qwen3_moe(out: Path, **over) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], max_position_embeddings=512)
    return _build(Qwen3MoeConfig, Qwen3MoeForCausalLM, kw | over, out)


def qwen2_moe(out: Path, **over) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
              shared_expert_intermediate_size=48, max_position_embeddings=512)
    return _build(Qwen2MoeConfig, Qwen2MoeForCausalLM, kw | over, out)


def mixtral(out: Path, **over) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    return _build(MixtralConfig, MixtralForCausalLM, kw | over, out)


def to_upstream_config(directory: Path) -> None:
    """Rewrite a transformers-5 config.json into the form the upstream DeepSeek repos ship."""
    p = directory / "config.json"
    cfg = json.loads(p.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp.pop("rope_type", None)
    cfg["rope_scaling"] = rp if rp.get("type") not in (None, "default") else None
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=1)
    p.write_text(json.dumps(cfg, indent=1))


def deepseek_v2_group(out: Path) -> Path:
    """V2's group_limited_greedy routing: softmax scores, best groups by their top expert."""
    return deepseek_v2(out, topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=24,
                       routed_scaling_factor=1.5)


BUILDERS = {"deepseek_v3": deepseek_v3, "deepseek_v2": deepseek_v2, "deepseek_v2_group": deepseek_v2_group,
            "qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe, "mixtral": mixtral}
