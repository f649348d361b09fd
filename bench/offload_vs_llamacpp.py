"""hybridmoe's offload engine against llama.cpp's llama-bench on the same synthetic GGUF, same machine, one run.

    python bench/offload_vs_llamacpp.py --llama-bench build/bin/llama-bench --shape deepseek_v3 --dir /data

Configurations (pp512 = prompt of 512 tokens, tg128 = 128 generated tokens, t/s mean ± std over --reps):
  cache off   llama.cpp `-ngl 99 -ot exps=CPU`; hybridmoe with 0 expert slots (every routed expert is served by
              the CPU at decode; prefill copies experts through staging slots when the cost model says so)
  budget 25%  llama.cpp keeps the experts of the first 25% of MoE layers on the GPU (its best static placement of
              whole layers for uniform routing); hybridmoe gets the same number of expert slots, dynamically
  all in VRAM llama.cpp `-ngl 99`; hybridmoe with every expert in a slot
and the budget case again on a file whose router is skewed (Zipf popularity through the correction bias).
Roofline: decode tok/s divided by (CPU read bandwidth / CPU-served expert bytes per token), both measured here.
hybridmoe runs with its default settings (--load adds options) and is measured as `hybridmoe bench` measures:
random token ids for pp512 and tg128, as llama-bench feeds them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import synthetic  # noqa: E402
import watch  # noqa: E402

import hybridmoe  # noqa: E402
from hybridmoe.engine.bench import BenchOptions, run_bench  # noqa: E402


def read_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a large f32 sum over all threads, best of 5."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return best


def h2d_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t0))
    return best


def llama_bench(exe: str, gguf: Path, args: list[str], threads: int, reps: int) -> dict:
    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", str(reps), "-o", "json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-2000:]}")
    res = {}
    for row in json.loads(out.stdout):
        test = "pp512" if row.get("n_prompt") else "tg128"
        res[test] = (row["avg_ts"], row["stddev_ts"])
    return res


def ours(gguf: Path, slots: int | None, reps: int, **load_kw) -> dict:
    """hybridmoe with its default settings (what a user gets; --load adds options), pp512 and tg128 measured as
    `hybridmoe bench` measures them: random token ids, as llama-bench feeds."""
    watch.phase(f"hybridmoe: loading {gguf.name}, slots {slots}")
    eng = hybridmoe.load(gguf, device="cuda", context=1024, expert_cache_slots=slots, **load_kw)
    rt = eng.model.experts
    watch.phase("hybridmoe: loaded")
    pp, tg = run_bench(eng, BenchOptions((512,), (128,), reps), progress=watch.phase)
    moe = eng.model.moe_layers()
    top_k = eng.model.layers[moe[0]].ffn.spec.top_k
    hit = tg.cache_hit_rate or 0.0
    res = {"pp512": (pp.mean, pp.std), "tg128": (tg.mean, tg.std), "pp512_reps": pp.samples,
           "tg128_reps": tg.samples, "hit_rate": hit, "prefetch_recall": tg.prefetch_recall, "slots": rt.slots,
           "cpu_expert_bytes_per_token": (1 - hit) * len(moe) * top_k * rt.store.expert_nbytes()}
    del eng, rt
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench built with CUDA")
    ap.add_argument("--shape", choices=sorted(synthetic.SHAPES), default="deepseek_v3")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 5 for DeepSeek, 48 Qwen)")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where the synthetic GGUF files are kept")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--zipf", type=float, default=1.2, help="skew of the second file's router")
    ap.add_argument("--only", default="off,budget,vram,skewed", help="configurations to run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--part", choices=("both", "ours", "llama"), default="both",
                    help="ours: measure hybridmoe only and keep the rows in --json; llama: measure llama.cpp and "
                         "complete the rows kept in --json (two calls on the same machine, e.g. while llama.cpp "
                         "is still building)")
    ap.add_argument("--load", default="{}", help="extra hybridmoe.load() options as JSON, e.g. "
                                                 "'{\"cpu_activations\": \"int8\"}'")
    a = ap.parse_args()
    watch.arm()
    load_kw = json.loads(a.load)
    kept = {}
    if a.part == "llama":
        if a.json is None or not a.json.exists():
            ap.error("--part llama needs the --json file that --part ours wrote")
        kept = {r["config"]: r["ours"] for r in json.loads(a.json.read_text())["rows"]}
    only = set(a.only.split(","))
    if a.part != "ours" and not a.llama_bench:
        ap.error("--llama-bench is required (except with --part ours)")
    if a.part == "ours" and a.json is None:
        ap.error("--part ours needs --json to keep its rows")
    torch.set_num_threads(a.threads)
    from hybridmoe.kernels.cpu import set_threads
    set_threads(a.threads)
    files = {}
    for kind, zipf in (("uniform", 0.0), ("skewed", a.zipf)):
        if kind == "skewed" and "skewed" not in only:
            continue
        path = a.dir / f"{a.shape}-{kind}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            synthetic.write(a.shape, path, a.layers, zipf, progress=False)
            print(f"wrote {path.name}: {path.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        files[kind] = path
    bw, h2d = read_bandwidth(), h2d_bandwidth()
    print(f"CPU read {bw / 1e9:.1f} GB/s, pinned H2D {h2d / 1e9:.1f} GB/s", flush=True)
    cfg = synthetic.SHAPES[a.shape]
    n_layers = a.layers or cfg["num_hidden_layers"]
    moe = [i for i in range(n_layers) if i >= cfg.get("first_k_dense_replace", 0)]
    n_exp = cfg.get("n_routed_experts") or cfg.get("num_experts")
    gpu_layers = moe[:max(1, len(moe) // 4)]
    cpu_exps = "|".join(str(i) for i in moe if i not in gpu_layers)
    budget_slots = len(gpu_layers) * n_exp
    plans = {"off": ("uniform", ["-ngl", "99", "-ot", "exps=CPU"], 0),
             "budget": ("uniform", ["-ngl", "99", "-ot", f"blk\\.({cpu_exps})\\.ffn_.*_exps=CPU"], budget_slots),
             "vram": ("uniform", ["-ngl", "99"], None),
             "skewed": ("skewed", ["-ngl", "99", "-ot", f"blk\\.({cpu_exps})\\.ffn_.*_exps=CPU"], budget_slots)}
    rows = []
    for name, (kind, largs, slots) in plans.items():
        if name not in only:
            continue
        if a.part == "llama" and name not in kept:
            continue
        watch.phase(f"{name}: llama-bench")
        lb = llama_bench(a.llama_bench, files[kind], largs, a.threads, a.reps) if a.part != "ours" else None
        us = kept[name] if a.part == "llama" else ours(files[kind], slots, a.reps, **load_kw)
        roof = bw / max(1.0, us["cpu_expert_bytes_per_token"])
        row = dict(config=name, file=kind, llama=lb, ours=us, roofline_tok_s=roof,
                   roofline_ratio=us["tg128"][0] / roof if us["cpu_expert_bytes_per_token"] else None)
        if lb is not None:
            row.update(decode_ratio=us["tg128"][0] / lb["tg128"][0], prefill_ratio=us["pp512"][0] / lb["pp512"][0])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.part == "ours":
        a.json.write_text(json.dumps({"bandwidth": bw, "h2d": h2d, "rows": rows}, indent=1))
        return 0
    print(f"\n{a.shape}, {n_layers} layers, {torch.cuda.get_device_name()}, {a.threads} threads, reps {a.reps}")
    print(f"{'config':<8}{'llama pp512':>13}{'ours pp512':>12}{'ratio':>7}{'llama tg128':>13}{'ours tg128':>12}"
          f"{'ratio':>7}{'roofline':>9}{'hit':>6}{'recall':>7}")
    for r in rows:
        lp, lt, op, ot = r["llama"]["pp512"], r["llama"]["tg128"], r["ours"]["pp512"], r["ours"]["tg128"]
        roof = f"{r['roofline_ratio']:.2f}" if r["roofline_ratio"] else "-"
        rec = r["ours"]["prefetch_recall"]
        print(f"{r['config']:<8}{lp[0]:>8.1f}±{lp[1]:<4.1f}{op[0]:>7.1f}±{op[1]:<4.1f}{r['prefill_ratio']:>7.2f}"
              f"{lt[0]:>8.1f}±{lt[1]:<4.1f}{ot[0]:>7.1f}±{ot[1]:<4.1f}{r['decode_ratio']:>7.2f}{roof:>9}"
              f"{r['ours']['hit_rate']:>6.2f}{(rec if rec is not None else float('nan')):>7.2f}")
    if a.json:
        a.json.write_text(json.dumps({"bandwidth": bw, "h2d": h2d, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
