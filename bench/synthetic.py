"""Synthetic GGUF files at real per-layer dims with random valid blocks, written tensor by tensor (a 25 GiB file
needs little RAM). Shapes: DeepSeek-V3 (1 dense + 4 MoE layers by default) and Qwen3-30B-A3B.

    python bench/synthetic.py deepseek_v3 /data/ds.gguf [--layers 5] [--zipf 1.2]

--zipf S gives DeepSeek's router a correction bias so that expert popularity follows roughly a Zipf law with
exponent S (real models are skewed; random weights route uniformly). The bias only steers the choice of experts,
as in the real model; it does not change their weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VOCAB = 384  # the test tokenizer's; a real vocabulary's head costs both engines alike

SHAPES = {
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=5, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
                        num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid",
                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu"),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144,
                      moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                      max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu"),
}


def tensor_list(cfg: dict, arch: str, expert_type: Q, other_type: Q) -> list[tuple[str, tuple[int, ...], Q]]:
    """(GGUF name, torch-order shape, type) of every tensor, from our module tree built on the meta device."""
    from hybridmoe.formats.gguf_names import GGUF_TENSORS
    from hybridmoe.formats.names import NameMap
    from hybridmoe.models.loader import expected_expert_names, model_args
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
        out.append((to_gguf(f"layers.{i}.experts.{proj}")[0], (args.n_routed_experts, *shape), expert_type))
    return out


def _random(shape: tuple[int, ...], qtype: Q, rng, scale: float) -> np.ndarray:
    if qtype == Q.F32:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    from hybridmoe.quant import random_blocks
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) // block
    return random_blocks(qtype, n, rng, scale=scale).reshape(*shape[:-1], shape[-1] // block * size)


def write(shape: str, path: Path, layers: int | None = None, zipf: float = 0.0,
          expert_type: Q = Q.Q4_K, other_type: Q = Q.Q8_0, progress: bool = True) -> Path:
    import tiny
    from hybridmoe.formats.convert import ARCH_OF_MODEL_TYPE, _metadata, _tokenizer
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    arch = ARCH_OF_MODEL_TYPE[cfg["model_type"]]
    rng = np.random.default_rng(0)
    tok_dir = Path(tempfile.mkdtemp())
    tiny.write_tokenizer(tok_dir)
    w = GGUFWriter(path, arch)
    _metadata(w, cfg, arch, f"synthetic-{shape}", LlamaFileType.MOSTLY_Q4_K_M)
    _tokenizer(w, tok_dir, cfg, None)
    tensors = tensor_list(cfg, arch, expert_type, other_type)
    n_experts = cfg.get("n_routed_experts") or cfg.get("num_experts")
    for name, shp, qt in tensors:
        block, size = GGML_QUANT_SIZES[qt]
        w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) // block * size, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total = sum(int(np.prod(s)) // GGML_QUANT_SIZES[q][0] * GGML_QUANT_SIZES[q][1] for _, s, q in tensors)
    done = 0
    # Zipf popularity: expert e (in a random order per layer) gets a boost log-proportional to 1/rank^s.
    boost = lambda: np.log(1.0 / (1 + rng.permutation(n_experts)) ** zipf).astype(np.float32)  # noqa: E731
    for name, shp, qt in tensors:
        w.tensors[0].pop(name)
        w.write_padding(fout, fout.tell())
        if name.endswith("exp_probs_b.bias"):
            data = (0.05 * boost() if zipf else np.zeros(shp, np.float32)).astype(np.float32)
        elif name.endswith("norm.weight"):
            data = np.ones(shp, np.float32)
        else:
            data = _random(shp, qt, rng, 0.02)
        for part in (data if data.ndim == 3 and data.shape[0] == n_experts else [data]):
            np.ascontiguousarray(part).tofile(fout)
        w.write_padding(fout, data.nbytes)
        w.state = WriterState.WEIGHTS
        done += data.nbytes
        if progress:
            print(f"\r{done / 2**30:6.2f}/{total / 2**30:.2f} GiB  {name:<36}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    w.close()
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--zipf", type=float, default=0.0)
    a = ap.parse_args()
    write(a.shape, a.out, a.layers, a.zipf)
    print(f"{a.out}: {a.out.stat().st_size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
