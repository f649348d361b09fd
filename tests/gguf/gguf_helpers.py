"""Helpers for the GGUF tests: tiny models whose rows are 256 wide (so K-quants apply), llama.cpp's quantizer,
a transformers reference filled with a GGUF's weights dequantized by the `gguf` package, and GGUF rewriting."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

import tiny

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False

# Rope: llama.cpp reads DeepSeek's yarn `mscale` as equal to `mscale_all_dim`, so the tiny model uses equal values.
DEEPSEEK = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                              "mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1})
QWEN = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, mlp_only_layers=[])
MIXTRAL = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4)
BUILD = {"deepseek_v3": (tiny.deepseek_v3, DEEPSEEK), "qwen3_moe": (tiny.qwen3_moe, QWEN),
         "mixtral": (tiny.mixtral, MIXTRAL)}
FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype


def build_hf(family: str, out: Path, scale: float = 0.25) -> Path:
    """A tiny checkpoint with weights `scale` times tiny.py's. With tiny.py's larger weights, 256-wide random models
    are chaotic enough that llama.cpp's 8-bit activations alone flip ~10% of the argmaxes (measured by quantizing
    our own activations the same way); trained models are far less sensitive."""
    from safetensors.torch import load_file, save_file
    builder, kw = BUILD[family]
    out = builder(out, **kw)
    weights = load_file(out / "model.safetensors")
    for name, t in weights.items():
        if "norm" not in name and "e_score_correction_bias" not in name:
            t.mul_(scale)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def llama_quantize(src: Path, dst: Path, kind: str) -> Path:
    """llama.cpp's quantizer with its standard per-tensor mix for `kind`."""
    import llama_cpp as L
    params = L.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[kind], 2
    assert L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def gguf_weights(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    return arch, {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
                  for t in r.tensors}


def reference_model(hf_dir: Path, gguf_path: Path):
    """transformers' model of `hf_dir`, with every weight replaced by the GGUF file's, dequantized by `gguf`."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config
    arch, w = gguf_weights(gguf_path)
    sd = {"model.embed_tokens.weight": w["token_embd.weight"], "model.norm.weight": w["output_norm.weight"],
          "lm_head.weight": w.get("output.weight", w["token_embd.weight"])}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd[p + "input_layernorm.weight"] = w[b + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = w[b + "ffn_norm.weight"]
        sd[p + "self_attn.o_proj.weight"] = w[b + "attn_output.weight"]
        if arch == "deepseek2":
            for hf, g in [("q_a_proj", "attn_q_a"), ("q_a_layernorm", "attn_q_a_norm"), ("q_b_proj", "attn_q_b"),
                          ("kv_a_proj_with_mqa", "attn_kv_a_mqa"), ("kv_a_layernorm", "attn_kv_a_norm")]:
                sd[p + f"self_attn.{hf}.weight"] = w[b + g + ".weight"]
            if b + "attn_kv_b.weight" in w:
                sd[p + "self_attn.kv_b_proj.weight"] = w[b + "attn_kv_b.weight"]
            else:
                k_b, v_b = w[b + "attn_k_b.weight"], w[b + "attn_v_b.weight"]  # [H, R, N], [H, V, R]
                kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)
                sd[p + "self_attn.kv_b_proj.weight"] = kv.reshape(-1, kv.shape[-1])
        else:
            q, k = w[b + "attn_q.weight"], w[b + "attn_k.weight"]
            if arch == "llama":  # the converter interleaved each head's rope pairs; put the halves back
                q, k = _halves(q, cfg.num_attention_heads), _halves(k, cfg.num_key_value_heads)
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"] = q, k
            sd[p + "self_attn.v_proj.weight"] = w[b + "attn_v.weight"]
            if arch == "qwen3moe":
                sd[p + "self_attn.q_norm.weight"] = w[b + "attn_q_norm.weight"]
                sd[p + "self_attn.k_norm.weight"] = w[b + "attn_k_norm.weight"]
        if b + "ffn_gate_inp.weight" in w:
            sd[p + "mlp.gate.weight"] = w[b + "ffn_gate_inp.weight"]
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat([w[b + "ffn_gate_exps.weight"],
                                                            w[b + "ffn_up_exps.weight"]], dim=1)
            sd[p + "mlp.experts.down_proj"] = w[b + "ffn_down_exps.weight"]
            if b + "exp_probs_b.bias" in w:
                sd[p + "mlp.gate.e_score_correction_bias"] = w[b + "exp_probs_b.bias"]
            for proj in ("gate", "up", "down"):
                if b + f"ffn_{proj}_shexp.weight" in w:
                    sd[p + f"mlp.shared_experts.{proj}_proj.weight"] = w[b + f"ffn_{proj}_shexp.weight"]
        else:
            for proj in ("gate", "up", "down"):
                sd[p + f"mlp.{proj}_proj.weight"] = w[b + f"ffn_{proj}.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def _halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def rewrite(src: Path, dst: Path, *, split_max_tensors: int = 0, drop=(), kv: dict | None = None,
            tensors: dict | None = None, arch: str | None = None) -> Path:
    """Copy a GGUF file: `drop` tensor names, set `kv` metadata (None deletes a key), replace or add `tensors`
    (name -> float32 array written as F32, or (raw uint8 bytes, GGML type)), optionally split into parts."""
    r = GGUFReader(src)
    arch = arch or r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    kv = kv or {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("split."):
            continue
        value = kv.pop(key) if key in kv else f.contents()
        if value is None:
            continue
        vtype = f.types[0]
        w.add_key_value(key, value, vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for key, value in kv.items():
        if value is not None:
            w.add_key_value(key, value, GGUFValueType.UINT32 if isinstance(value, int) else GGUFValueType.FLOAT32)
    tensors = dict(tensors or {})
    for t in r.tensors:
        if t.name in drop:
            continue
        if t.name not in tensors:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    for name, arr in tensors.items():
        if isinstance(arr, tuple):
            w.add_tensor(name, arr[0], raw_shape=arr[0].shape, raw_dtype=arr[1])
        else:
            w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama
    m = Llama(str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2, verbose=False)
    m.eval(ids)
    out = np.array(m.scores[:len(ids)], dtype=np.float32)
    m.close()
    return out


def nll(logits, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1]."""
    logp = torch.log_softmax(torch.as_tensor(logits)[:-1].double(), dim=-1)
    return float(-logp.gather(1, torch.tensor(ids[1:])[:, None]).mean())
