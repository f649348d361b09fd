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

from gguf import GGMLQuantizationType as Q

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

VOCAB = 384  # the test tokenizer's; a real vocabulary's head costs both engines alike

# 8192 positions: a 4096-token prompt (bench/prefill_vs_llamacpp.py) fits the engine's context
SHAPES = {
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=5, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
                        num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid",
                        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu"),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144,
                      moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                      max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu"),
}


def write(shape: str, path: Path, layers: int | None = None, zipf: float = 0.0,
          expert_type: Q = Q.Q4_K, other_type: Q = Q.Q8_0, progress: bool = True) -> Path:
    import tiny
    from hybridmoe.models import synthetic
    cfg = dict(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    tok_dir = Path(tempfile.mkdtemp())
    tiny.write_tokenizer(tok_dir)

    def show(done: int, total: int, name: str) -> None:
        print(f"\r{done / 2**30:6.2f}/{total / 2**30:.2f} GiB  {name:<36}", end="", file=sys.stderr, flush=True)
    synthetic.write(cfg, path, tok_dir, f"synthetic-{shape}", zipf, expert_type, other_type,
                    show if progress else None)
    if progress:
        print(file=sys.stderr)
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
