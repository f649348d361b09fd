"""One registration per model family, as data: the HF model_type names it takes, its tensor names in HF checkpoints
and in GGUF files (which the loaders and the converter read), and its GGUF metadata keys. models/<name>.py builds the
family's modules; models/__init__.py imports each registered family from there. docs/adding-a-model.md says how to
add one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gguf_names import GGUF_COMMON, GGUF_GQA, GGUF_MLA, SHARED_KEYS
from .names import HF_COMMON, HF_DEEPSEEK_MOE, HF_GQA, HF_MIXTRAL_MOE, HF_MLA, HF_QWEN_MOE


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # the module models/<name>.py
    model_types: tuple[str, ...]  # config.json model_type values it runs (the first one is written for GGUF files)
    hf_tensors: dict[str, str]  # HF tensor name -> ours
    gguf_arch: str  # llama.cpp's architecture name, `general.architecture`
    gguf_tensors: dict[str, str]  # GGUF tensor name -> ours
    gguf_keys: dict[str, str]  # metadata `{arch}.<key>` -> config.json key
    gguf_required: tuple[str, ...]  # metadata keys a file must have
    # config.json model_type of this architecture's GGUF files; None: the reader decides from the file
    gguf_model_type: str | None = None
    # llama.cpp's converter reorders the rows of Q and K of some architectures so that its rope rotates adjacent
    # pairs; ours rotates halves, so these rows are put back (our name -> config key holding that head count)
    gguf_rope_permuted: dict[str, str] = field(default_factory=dict)
    # model_types the converter writes as gguf_arch (None: all of model_types)
    converts: tuple[str, ...] | None = None


DEEPSEEK_V3 = Family(
    "deepseek_v3", ("deepseek_v3", "deepseek_v2"), HF_COMMON | HF_MLA | HF_DEEPSEEK_MOE,
    "deepseek2", GGUF_COMMON | GGUF_MLA,
    SHARED_KEYS | {
        "vocab_size": "vocab_size",
        "attention.q_lora_rank": "q_lora_rank",
        "attention.kv_lora_rank": "kv_lora_rank",
        "attention.key_length": "key_length",
        "attention.value_length": "value_length",
        "attention.key_length_mla": "key_length_mla",
        "attention.value_length_mla": "value_length_mla",
        "rope.dimension_count": "qk_rope_head_dim",
        "expert_shared_count": "n_shared_experts",
        "leading_dense_block_count": "first_k_dense_replace",
        "expert_group_count": "n_group",
        "expert_group_used_count": "topk_group",
        "expert_weights_scale": "routed_scaling_factor",
        "expert_weights_norm": "norm_topk_prob",
        "expert_gating_func": "expert_gating_func",
    },
    ("embedding_length", "block_count", "attention.head_count", "attention.kv_lora_rank", "rope.dimension_count",
     "attention.layer_norm_rms_epsilon"),
    gguf_model_type=None,  # deepseek2 is V3 or V2, by its gating function
)

QWEN3_MOE = Family(
    "qwen3_moe", ("qwen3_moe", "qwen2_moe"), HF_COMMON | HF_GQA | HF_QWEN_MOE,
    "qwen3moe", GGUF_COMMON | GGUF_GQA,
    SHARED_KEYS | {
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
    },
    ("embedding_length", "block_count", "attention.head_count", "expert_count", "expert_used_count",
     "expert_feed_forward_length", "attention.layer_norm_rms_epsilon"),
    gguf_model_type="qwen3_moe",
    converts=("qwen3_moe",),  # Qwen2-MoE's shared-expert gate is llama.cpp's qwen2moe, not written here
)

MIXTRAL = Family(
    "mixtral", ("mixtral",), HF_COMMON | HF_GQA | HF_MIXTRAL_MOE,
    "llama", GGUF_COMMON | GGUF_GQA,
    SHARED_KEYS | {
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
        "vocab_size": "vocab_size",
    },
    ("embedding_length", "block_count", "attention.head_count", "expert_count", "expert_used_count",
     "feed_forward_length", "attention.layer_norm_rms_epsilon"),
    gguf_model_type="mixtral",
    gguf_rope_permuted={"layers.{i}.attn.wq.weight": "num_attention_heads",
                        "layers.{i}.attn.wk.weight": "num_key_value_heads"},
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DEEPSEEK_V3, QWEN3_MOE, MIXTRAL)}

# Lookups derived from the registrations, as the readers and writers use them.
BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
HF_TABLES = {f.name: f.hf_tensors for f in FAMILIES.values()}
GGUF_TENSORS = {f.gguf_arch: f.gguf_tensors for f in FAMILIES.values()}
GGUF_KEYS = {f.gguf_arch: f.gguf_keys for f in FAMILIES.values()}
GGUF_REQUIRED = {f.gguf_arch: f.gguf_required for f in FAMILIES.values()}
GGUF_MODEL_TYPES = {f.gguf_arch: f.gguf_model_type for f in FAMILIES.values() if f.gguf_model_type}
GGUF_ROPE_PERMUTED = {f.gguf_arch: f.gguf_rope_permuted for f in FAMILIES.values() if f.gguf_rope_permuted}
ARCH_OF_MODEL_TYPE = {t: f.gguf_arch for f in FAMILIES.values() for t in (f.converts or f.model_types)}
