"""CPU decode and prefill speed of hybridmoe against llama.cpp (llama-cpp-python) on the same GGUF file, same threads.

The file is synthetic: random valid blocks at Qwen3-30B-A3B's real per-layer dims (hidden 2048, 128 experts of
768, 8 per token, 32 query / 4 KV heads of 128), a few layers, routed experts Q4_K, the rest Q8_0, and a small
vocabulary (the lm_head of a real vocabulary costs both sides alike). Speeds, not outputs, are compared.
`--experts q2_k` makes the experts Q2_K / Q2_K / Q3_K (gate, up, down), as most layers of the popular 2-bit dynamic
quants of DeepSeek-R1 are.

    python bench/cpu_decode.py [--layers 4] [--threads 2] [--decode 32] [--prefill 128] [--rounds 3] [--keep FILE]
                               [--experts q4_k|q2_k] [--only "mmap int8 acts,pinned int8 acts"]
"""
from __future__ import annotations

import argparse
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


def bench_ours(path: Path, ids: list[int], n_decode: int, tier: str, activations: str = "f32") -> tuple[float, float]:
    import hybridmoe
    from hybridmoe.layers.cache import Batch
    model = hybridmoe.load(path, device="cpu", experts_tier=tier, cpu_activations=activations).model
    cache = model.new_cache(1, len(ids) + n_decode + 1)
    with torch.inference_mode():
        model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache)  # warm-up: compile, page in, pack
        for step in range(2):  # and the kernels only decode runs (loading them costs ~17 ms on the first step)
            model(torch.tensor([[ids[step]]]), Batch.make([len(ids) + step], [1], [0], "cpu"), cache, last_only=True)
        cache = model.new_cache(1, len(ids) + n_decode + 1)
        t0 = time.perf_counter()
        logits = model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache, last_only=True)
        prefill = len(ids) / (time.perf_counter() - t0)
        tok, t0 = int(logits[0].argmax()), time.perf_counter()
        for step in range(n_decode):
            logits = model(torch.tensor([[tok]]), Batch.make([len(ids) + step], [1], [0], "cpu"), cache,
                           last_only=True)
            tok = int(logits[0].argmax())
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each contender keeps its best")
    ap.add_argument("--keep", type=Path, default=None, help="write (or reuse) the synthetic GGUF here")
    ap.add_argument("--experts", choices=sorted(EXPERT_TYPES), default="q4_k",
                    help="expert types: q4_k (gate, up, down all Q4_K) or q2_k (Q2_K, Q2_K, Q3_K); default q4_k")
    ap.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hybridmoe.kernels.cpu import set_threads
    set_threads(a.threads)
    path = a.keep or Path(tempfile.mkdtemp()) / "synthetic.gguf"
    ids = np.random.default_rng(1).integers(8, VOCAB, a.prefill).tolist()
    # Rounds alternate the contenders and each keeps its best round, so that other load on the machine biases
    # no one in particular.
    runs = {"hybridmoe mmap": lambda: bench_ours(path, ids, a.decode, "mmap"),
            "mmap int8 acts": lambda: bench_ours(path, ids, a.decode, "mmap", "int8"),
            "hybridmoe pinned": lambda: bench_ours(path, ids, a.decode, "pinned"),
            "pinned int8 acts": lambda: bench_ours(path, ids, a.decode, "pinned", "int8"),
            "pinned int8-all": lambda: bench_ours(path, ids, a.decode, "pinned", "int8-all"),
            "llama.cpp": lambda: bench_llama(path, ids, a.decode, a.threads)}
    if a.only:
        keep = {name.strip() for name in a.only.split(",")}
        if keep - set(runs):
            ap.error(f"--only: no contender {', '.join(sorted(keep - set(runs)))} (have: {', '.join(runs)})")
        runs = {name: run for name, run in runs.items() if name in keep | {"llama.cpp"}}
    if not path.exists():
        t0 = time.perf_counter()
        write_model(path, a.layers, a.experts)
        print(f"wrote {path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    else:  # a kept file must be what the flags describe
        from hybridmoe.formats.gguf import GGUFFile
        got = GGUFFile(path).tensors["blk.0.ffn_gate_exps.weight"].qtype
        if got != EXPERT_TYPES[a.experts][0]:
            ap.error(f"--keep {path}: its experts are {got.name}, not --experts {a.experts}; pass another file")
    best = {name: (0.0, 0.0) for name in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            p, d = run()
            best[name] = (max(best[name][0], p), max(best[name][1], d))
    theirs = best.pop("llama.cpp")
    rows = best
    print(f"{'':18}{'prefill ' + str(a.prefill) + ' tok/s':>22}{'decode tok/s':>16}   ({a.threads} threads)")
    for name, (p, d) in rows.items():
        print(f"{name:18}{p:>22.1f}{d:>16.2f}   ratio to llama.cpp: prefill {p / theirs[0]:.2f}, decode "
              f"{d / theirs[1]:.2f}")
    print(f"{'llama.cpp':18}{theirs[0]:>22.1f}{theirs[1]:>16.2f}")


if __name__ == "__main__":
    main()
