"""CPU decode and prefill speed of hybridmoe against llama.cpp (llama-cpp-python) on the same GGUF file, same threads,
for two shapes, hybridmoe with its default settings (what a user gets; `--only` adds other modes).

The files are synthetic: random valid blocks at real per-layer dims, a few layers, routed experts Q4_K, the rest
Q8_0, and a small vocabulary (the lm_head of a real vocabulary costs both sides alike). Speeds, not outputs, are
compared: both sides get the same random token ids, as llama-bench feeds them (the prompt, then its ids again one
at a time for decode, each step computing the last token's logits).
    qwen3     Qwen3-30B-A3B's layers: hidden 2048, 128 experts of 768, 8 per token, 32 query / 4 KV heads of 128
              (4 layers by default)
    deepseek  DeepSeek-V3's layer design at hidden 2048: MLA (16 heads, q rank 1536, kv rank 512, rope 64, nope 128,
              v 128), 32 experts of 1536, 8 per token from 4 of 8 groups (sigmoid, correction bias), one shared
              expert, a dense first layer (6144) before the MoE layers (8 by default)
`--experts q2_k` makes the experts Q2_K / Q2_K / Q3_K (gate, up, down), as most layers of the popular 2-bit dynamic
quants of DeepSeek-R1 are.

    python bench/cpu_decode.py [--shapes deepseek,qwen3] [--layers N] [--threads 2] [--decode 32] [--prefill 128]
                               [--rounds 3] [--keep DIR] [--experts q4_k|q2_k] [--only "exact f32,pinned"]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]

D, I, E, K, H, HKV, HD, VOCAB = 2048, 768, 128, 8, 32, 4, 128, 384
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144,
                moe_intermediate_size=1536, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                n_routed_experts=32, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
                topk_group=4, num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True,
                scoring_func="sigmoid", max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                hidden_act="silu")
LAYERS = {"qwen3": 4, "deepseek": 8}  # MoE layers by default


def _blocks(shape: tuple[int, ...], qtype: Q, rng) -> np.ndarray:
    from hybridmoe.quant import random_blocks
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) // block
    return random_blocks(qtype, n, rng, scale=0.02).reshape(*shape[:-1], shape[-1] // block * size)


EXPERT_TYPES = {"q4_k": (Q.Q4_K, Q.Q4_K, Q.Q4_K),
                "q2_k": (Q.Q2_K, Q.Q2_K, Q.Q3_K)}  # gate, up, down: most layers of DeepSeek-R1's dynamic 2-bit quants


def write_model(path: Path, layers: int, experts: str = "q4_k") -> Path:
    import tiny
    from hybridmoe.models.convert import _tokenizer
    rng = np.random.default_rng(0)
    tok_dir = Path(tempfile.mkdtemp())
    tiny.write_tokenizer(tok_dir)
    w = GGUFWriter(path, "qwen3moe")
    w.add_name("synthetic-qwen3-30b-a3b-dims")
    for add, v in ((w.add_context_length, 4096), (w.add_embedding_length, D), (w.add_block_count, layers),
                   (w.add_feed_forward_length, 6144), (w.add_head_count, H), (w.add_head_count_kv, HKV),
                   (w.add_key_length, HD), (w.add_value_length, HD), (w.add_expert_count, E),
                   (w.add_expert_used_count, K), (w.add_expert_feed_forward_length, I)):
        add(v)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    _tokenizer(w, tok_dir, {"vocab_size": VOCAB, "model_type": "qwen3_moe"}, None)

    def q(name, shape, qtype=Q.Q8_0):
        raw = _blocks(shape, qtype, rng)  # uint8 [..., row_bytes]: GGUFWriter takes the byte shape
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    def f32(name, arr):
        w.add_tensor(name, arr.astype(np.float32))

    q("token_embd.weight", (VOCAB, D))
    q("output.weight", (VOCAB, D))
    f32("output_norm.weight", np.ones(D))
    for i in range(layers):
        b = f"blk.{i}."
        for n, dim in (("attn_norm", D), ("ffn_norm", D), ("attn_q_norm", HD), ("attn_k_norm", HD)):
            f32(b + n + ".weight", np.ones(dim))
        q(b + "attn_q.weight", (H * HD, D))
        q(b + "attn_k.weight", (HKV * HD, D))
        q(b + "attn_v.weight", (HKV * HD, D))
        q(b + "attn_output.weight", (D, H * HD))
        f32(b + "ffn_gate_inp.weight", rng.standard_normal((E, D)) * 0.02)
        gate, up, down = EXPERT_TYPES[experts]
        q(b + "ffn_gate_exps.weight", (E, I, D), gate)
        q(b + "ffn_up_exps.weight", (E, I, D), up)
        q(b + "ffn_down_exps.weight", (E, D, I), down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_deepseek(path: Path, moe_layers: int, experts: str = "q4_k") -> Path:
    import tiny
    from hybridmoe.models import synthetic
    tok_dir = Path(tempfile.mkdtemp())
    tiny.write_tokenizer(tok_dir)
    cfg = dict(DEEPSEEK, num_hidden_layers=1 + moe_layers)
    return synthetic.write(cfg, path, tok_dir, "synthetic-deepseek-v3-design-2048", expert_types=EXPERT_TYPES[experts])


def bench_ours(path: Path, ids: list[int], n_decode: int, load: dict) -> tuple[float, float]:
    import hybridmoe
    from hybridmoe.layers.cache import Batch
    model = hybridmoe.load(path, device="cpu", **load).model
    cache = model.new_cache(1, len(ids) + n_decode + 1)
    with torch.inference_mode():
        model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache)  # warm-up: compile, page in, pack
        for step in range(2):  # and the kernels only decode runs (loading them costs ~17 ms on the first step)
            model(torch.tensor([[ids[step]]]), Batch.make([len(ids) + step], [1], [0], "cpu"), cache, last_only=True)
        cache = model.new_cache(1, len(ids) + n_decode + 1)
        t0 = time.perf_counter()
        model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache, last_only=True)
        prefill = len(ids) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for step in range(n_decode):  # the token stream llama.cpp gets below: the prompt's random ids again
            model(torch.tensor([[ids[step % len(ids)]]]), Batch.make([len(ids) + step], [1], [0], "cpu"), cache,
                  last_only=True)
        decode = n_decode / (time.perf_counter() - t0)
    return prefill, decode


def bench_llama(path: Path, ids: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama
    m = Llama(str(path), n_ctx=len(ids) + n_decode + 8, n_batch=len(ids), n_threads=threads,
              n_threads_batch=threads, verbose=False)
    m.eval(ids[:4])
    for tok in ids[4:6]:  # two decode steps, as ours warm up
        m.eval([tok])
    m.reset()
    t0 = time.perf_counter()
    m.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(n_decode):
        m.eval([ids[step % len(ids)]])
    decode = n_decode / (time.perf_counter() - t0)
    m.close()
    return prefill, decode


CONTENDERS = {"hybridmoe": {},  # the defaults: mmap tier, 8-bit activations for every quantized matrix
              "exact f32": {"cpu_activations": "f32"},
              "int8 experts": {"cpu_activations": "int8"},
              "pinned": {"experts_tier": "pinned"},
              "pinned f32": {"experts_tier": "pinned", "cpu_activations": "f32"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="deepseek,qwen3", help="comma-separated: deepseek, qwen3 (default: both)")
    ap.add_argument("--layers", type=int, default=None, help="MoE layers (default: deepseek 8, qwen3 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each contender keeps its best")
    ap.add_argument("--keep", type=Path, default=None, help="a directory to write (or reuse) the synthetic GGUFs in")
    ap.add_argument("--experts", choices=sorted(EXPERT_TYPES), default="q4_k",
                    help="expert types: q4_k (gate, up, down all Q4_K) or q2_k (Q2_K, Q2_K, Q3_K); default q4_k")
    ap.add_argument("--only", default=None, help="comma-separated hybridmoe contenders (default: hybridmoe, its "
                    f"default settings; others: {', '.join(list(CONTENDERS)[1:])}); llama.cpp always runs")
    a = ap.parse_args()
    shapes = [x.strip() for x in a.shapes.split(",")]
    if set(shapes) - set(LAYERS):
        ap.error(f"--shapes: no shape {', '.join(sorted(set(shapes) - set(LAYERS)))} (have: {', '.join(LAYERS)})")
    names = [x.strip() for x in (a.only or "hybridmoe").split(",")]
    if set(names) - set(CONTENDERS):
        ap.error(f"--only: no contender {', '.join(sorted(set(names) - set(CONTENDERS)))} "
                 f"(have: {', '.join(CONTENDERS)})")
    torch.set_num_threads(a.threads)
    from hybridmoe.kernels.cpu import set_threads
    set_threads(a.threads)
    folder = a.keep or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(1).integers(8, VOCAB, a.prefill).tolist()
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    for shape in shapes:
        layers = a.layers or LAYERS[shape]
        path = folder / f"cpu_decode-{shape}-{layers}-{a.experts}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            (write_deepseek if shape == "deepseek" else write_model)(path, layers, a.experts)
            print(f"wrote {path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
        # Rounds alternate the contenders and each keeps its best round, so that other load on the machine biases
        # no one in particular.
        runs = {name: (lambda load=CONTENDERS[name]: bench_ours(path, ids, a.decode, load)) for name in names}
        runs["llama.cpp"] = lambda: bench_llama(path, ids, a.decode, a.threads)
        best = {name: (0.0, 0.0) for name in runs}
        for _ in range(a.rounds):
            for name, run in runs.items():
                p, d = run()
                best[name] = (max(best[name][0], p), max(best[name][1], d))
        theirs = best.pop("llama.cpp")
        print(f"\n{path.name}: {a.threads} threads, best of {a.rounds}, load average now "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'':18}{'prefill ' + str(a.prefill) + ' tok/s':>22}{'decode tok/s':>16}")
        for name, (p, d) in best.items():
            print(f"{name:18}{p:>22.1f}{d:>16.2f}   ratio to llama.cpp: prefill {p / theirs[0]:.2f}, decode "
                  f"{d / theirs[1]:.2f}")
        print(f"{'llama.cpp':18}{theirs[0]:>22.1f}{theirs[1]:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
