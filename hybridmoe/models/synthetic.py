"""GGUF files of random valid blocks for a config, written tensor by tensor (a 25 GiB file needs little RAM).

They serve benchmarks at real layer shapes (bench/synthetic.py) and the engine's overhead measurement
(engine/calibrate.py), which times a small "twin" of a model: the same family, routing width and block types
at small dims, so that what it measures is the engine's fixed cost per step, layer and expert. It sits with the
models because a file's tensor list comes from the family's module tree.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "demo_model"  # tokenizer.json with 4096 tokens
DEMO_VOCAB = 4096

# Small dims of a twin, all whole blocks of every GGUF type (256 weights): config key -> size.
TWIN_DIMS = {"hidden_size": 512, "intermediate_size": 512, "moe_intermediate_size": 256,
             "shared_expert_intermediate_size": 256, "head_dim": 128, "q_lora_rank": 256, "kv_lora_rank": 256,
             "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
TWIN_HEADS = 4


def tensor_list(cfg: dict, arch: str, expert_types: tuple[Q, Q, Q], other_type: Q) -> list[tuple[str, tuple, Q]]:
    """(GGUF name, torch-order shape, type) of every tensor, from our module tree built on the meta device.
    expert_types: of the gate, up and down experts."""
    from ..formats.families import GGUF_TENSORS
    from ..formats.names import NameMap
    from .loader import expected_expert_names, model_args
    family, args = model_args(cfg)
    with torch.device("meta"):
        model = family.build(args)
    to_gguf = NameMap({ours: g for g, ours in GGUF_TENSORS[arch].items() if ":" not in ours})
    out = []
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("attn.wkv_b.weight"):  # llama.cpp's MLA form: k_b [H, R, N] and v_b [H, V, R]
            i, H, R = name.split(".")[1], cfg["num_attention_heads"], cfg["kv_lora_rank"]
            N, V = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            out += [(f"blk.{i}.attn_k_b.weight", (H, R, N), other_type), (f"blk.{i}.attn_v_b.weight", (H, V, R),
                                                                         other_type)]
            continue
        g = to_gguf(name)[0]
        qt = Q.F32 if len(shape) == 1 or "ffn_gate_inp" in g else other_type
        out.append((g, shape, qt))
    per_layer = {}
    for name, shape in expected_expert_names(args, model).items():
        _, i, _, e, proj = name.split(".")
        per_layer.setdefault((int(i), proj), shape)
    for (i, proj), shape in sorted(per_layer.items()):
        qt = expert_types[("gate", "up", "down").index(proj)]
        out.append((to_gguf(f"layers.{i}.experts.{proj}")[0], (args.n_routed_experts, *shape), qt))
    return out


def _random(shape: tuple[int, ...], qtype: Q, rng, scale: float) -> np.ndarray:
    if qtype == Q.F32:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    from ..quant import random_blocks
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) // block
    return random_blocks(qtype, n, rng, scale=scale).reshape(*shape[:-1], shape[-1] // block * size)


def write(cfg: dict, path: Path, tokenizer_dir: Path, name: str = "synthetic", zipf: float = 0.0,
          expert_types: Q | tuple[Q, Q, Q] = Q.Q4_K, other_type: Q = Q.Q8_0, progress=None) -> Path:
    """A GGUF file for HF config `cfg` with random valid blocks; the tokenizer from `tokenizer_dir`.
    zipf S: a router correction bias (DeepSeek) that makes expert popularity roughly Zipf with exponent S.
    progress(done_bytes, total_bytes, tensor_name) is called after each tensor."""
    from .convert import _metadata, _tokenizer
    from ..formats.families import ARCH_OF_MODEL_TYPE
    if not isinstance(expert_types, tuple):
        expert_types = (expert_types,) * 3
    arch = ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, arch)
    _metadata(w, cfg, arch, name, LlamaFileType.MOSTLY_Q4_K_M)
    _tokenizer(w, Path(tokenizer_dir), cfg, None)
    tensors = tensor_list(cfg, arch, expert_types, other_type)
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    for tname, shp, qt in tensors:
        block, size = GGML_QUANT_SIZES[qt]
        w.add_tensor_info(tname, shp, np.dtype(np.float32), int(np.prod(shp)) // block * size, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total = sum(int(np.prod(s)) // GGML_QUANT_SIZES[q][0] * GGML_QUANT_SIZES[q][1] for _, s, q in tensors)
    done = 0
    # Zipf popularity: expert e (in a random order per layer) gets a boost log-proportional to 1/rank^s.
    boost = lambda: np.log(1.0 / (1 + rng.permutation(n_experts)) ** zipf).astype(np.float32)  # noqa: E731
    for tname, shp, qt in tensors:
        w.tensors[0].pop(tname)
        w.write_padding(fout, fout.tell())
        if tname.endswith("exp_probs_b.bias"):
            data = (0.05 * boost() if zipf else np.zeros(shp, np.float32)).astype(np.float32)
        elif tname.endswith("norm.weight"):
            data = np.ones(shp, np.float32)
        else:
            data = _random(shp, qt, rng, 0.02)
        for part in (data if data.ndim == 3 and data.shape[0] == n_experts else [data]):
            np.ascontiguousarray(part).tofile(fout)
        w.write_padding(fout, data.nbytes)
        w.state = WriterState.WEIGHTS
        done += data.nbytes
        if progress is not None:
            progress(done, total, tname)
    w.close()
    return path


def twin_config(cfg: dict, moe_layers: int) -> dict:
    """A small model of `cfg`'s family: the same routing (experts per token, groups), at most one dense layer
    before the MoE layers, `moe_layers` MoE layers, small dims, and the demo model's vocabulary."""
    out = dict(cfg)
    for key, size in TWIN_DIMS.items():
        if out.get(key):
            out[key] = size
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out["num_attention_heads"] = TWIN_HEADS
    out["num_key_value_heads"] = max(1, TWIN_HEADS * kv // heads) if kv < heads else TWIN_HEADS
    top_k = cfg.get("num_experts_per_tok") or 1
    groups = cfg.get("n_group") or 1
    n_experts = groups * math.ceil(4 * top_k / groups)  # each group keeps 4 * top_k / groups candidates
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if out.get(key):
            out[key] = min(out[key], n_experts)
    dense = min(1, cfg.get("first_k_dense_replace") or 0)
    if "first_k_dense_replace" in out:
        out["first_k_dense_replace"] = dense
    out["num_hidden_layers"] = dense + moe_layers
    out["vocab_size"] = DEMO_VOCAB
    out["tie_word_embeddings"] = False
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template", "rope_scaling"):
        out.pop(key, None)
    out["max_position_embeddings"] = max(512, min(4096, cfg.get("max_position_embeddings") or 4096))
    return out


def write_twin(cfg: dict, moe_layers: int, path: Path, expert_types: tuple[Q, Q, Q],
               other_type: Q = Q.Q8_0) -> Path:
    """A twin of `cfg` (twin_config) as a GGUF file with the demo model's tokenizer."""
    return write(twin_config(cfg, moe_layers), path, DEMO_TOKENIZER, f"twin-{cfg['model_type']}",
                 expert_types=expert_types, other_type=other_type)
