"""Types and ranges of the config values the model families read, checked before any module is built: a wrong type
must not surface as a foreign exception deep in torch, a negative epsilon or a zero rope base must not turn every
logit into NaN, and a count of ten million layers must not build ten million modules."""
from __future__ import annotations

import math

from ..errors import ConfigError

MAX_LAYERS = 1024  # llama.cpp allows 512; the largest released models have about 130
MAX_EXPERTS = 16384  # llama.cpp allows 512; released MoE models have up to 384 (sizes are checked again on load)
MAX_SIZE = 2 ** 31 - 1

AT_LEAST_ONE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok",
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings",
                "moe_layer_freq", "decoder_sparse_step", "n_group", "topk_group", "num_key_value_heads", "head_dim")
AT_LEAST_ZERO = ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts", "num_local_experts",
                 "n_shared_experts", "first_k_dense_replace", "shared_expert_intermediate_size",
                 "num_nextn_predict_layers", "q_lora_rank", "sliding_window")  # 0: none
EXPERT_COUNTS = ("n_routed_experts", "num_experts", "num_local_experts")
BOOLS = ("tie_word_embeddings", "norm_topk_prob", "attention_bias", "qkv_bias", "rope_interleave")
EVEN = ("qk_rope_head_dim", "head_dim")  # rotary dimensions rotate pairs
# key -> (lowest allowed, whether the lowest is excluded, highest allowed or None)
FLOATS = {"rms_norm_eps": (0.0, True, 1.0), "routed_scaling_factor": (0.0, False, None),
          "rope_theta": (1.0, True, None)}
ROPE_FLOATS = {"rope_theta": (1.0, True, None), "factor": (0.0, True, None), "beta_fast": (0.0, True, None),
               "beta_slow": (0.0, True, None), "mscale": (0.0, False, None), "mscale_all_dim": (0.0, False, None),
               "attention_factor": (0.0, True, None), "low_freq_factor": (0.0, True, None),
               "high_freq_factor": (0.0, True, None)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: dict, where: str = "config.json", names: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming the key (as `names` spells it: GGUF metadata keys for a GGUF file) and the file
    for the first value of a wrong type or out of range. Absent (None) values are left to the families' defaults."""
    names = names or {}

    def fail(key: str, value, want: str) -> ConfigError:
        return ConfigError(f"{where}: {names.get(key, key)} is {value!r}; it must be {want}")

    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        raise fail("model_type", mt, "a string such as \"deepseek_v3\"")
    for key, low in [(k, 1) for k in AT_LEAST_ONE] + [(k, 0) for k in AT_LEAST_ZERO]:
        v = cfg.get(key)
        if v is not None and not (_is_int(v) and low <= v <= MAX_SIZE):
            raise fail(key, v, f"a whole number of at least {low}")
    for key in EVEN:
        if cfg.get(key) is not None and cfg[key] % 2:
            raise fail(key, cfg[key], "even (rotary embeddings turn pairs of values)")
    if (cfg.get("num_hidden_layers") or 0) > MAX_LAYERS:
        raise fail("num_hidden_layers", cfg["num_hidden_layers"], f"at most {MAX_LAYERS}")
    for key in EXPERT_COUNTS:
        if (cfg.get(key) or 0) > MAX_EXPERTS:
            raise fail(key, cfg[key], f"at most {MAX_EXPERTS}")
    for key in BOOLS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise fail(key, cfg[key], "true or false")
    for key, bounds in FLOATS.items():
        _check_float(cfg.get(key), bounds, lambda want, k=key: fail(k, cfg[k], want))
    for key in ("eos_token_id", "bos_token_id"):
        ids = cfg.get(key)
        if ids is not None and not (_is_int(ids) or isinstance(ids, list) and all(_is_int(i) for i in ids)):
            raise fail(key, ids, "a token id or a list of token ids")
    quant = cfg.get("quantization_config")
    if quant is not None:
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        if not isinstance(quant, dict) or block is not None and not (
                isinstance(block, list) and len(block) == 2 and all(_is_int(b) and b >= 1 for b in block)):
            raise fail("quantization_config", quant, "an object with weight_block_size [rows, columns]")
    layers = cfg.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers)):
        raise fail("mlp_only_layers", layers, "a list of layer numbers")
    for section in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(section)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise fail(section, rope, "an object of rope settings")
        for key, bounds in ROPE_FLOATS.items():
            _check_float(rope.get(key), bounds, lambda want, k=key, s=section: fail(f"{s}.{k}", rope[k], want))
        orig = rope.get("original_max_position_embeddings")
        if orig is not None and not (_is_int(orig) and 1 <= orig <= MAX_SIZE):
            raise fail(f"{section}.original_max_position_embeddings", orig, "a whole number of at least 1")
        kind = rope.get("rope_type", rope.get("type"))
        if kind is not None and not isinstance(kind, str):
            raise fail(f"{section}.rope_type", kind, "a string such as \"yarn\"")


def _check_float(v, bounds: tuple[float, bool, float | None], fail) -> None:
    if v is None:
        return
    low, open_low, high = bounds
    if isinstance(v, str):  # JSON has no NaN; configs spell it "nan" and float() would accept it
        raise fail("a finite number, not a string")
    ok = _is_number(v) and math.isfinite(v) and (v > low if open_low else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'above' if open_low else 'at least'} {low:g}" + (f" and below {high:g}" if high is not None else "")
        raise fail(f"a finite number {rng}")
