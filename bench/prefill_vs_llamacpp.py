"""Prefill (prompt processing) of hybridmoe's offload engine against llama.cpp's llama-bench on the same synthetic
GGUF, same machine, one call: pp512 and pp4096 against llama.cpp's `-ub 512` (its default), `-ub 2048` and
`-ub 4096`, and the rate at which hybridmoe's expert copies crossed PCIe against the pinned host-to-device rate
measured in the same run.

    python bench/prefill_vs_llamacpp.py --llama-bench build/bin/llama-bench --shape qwen3_moe --dir /data

Configurations (t/s, mean ± std over --reps):
  off    llama.cpp `-ngl 99 -ot exps=CPU`; hybridmoe with no expert cache (prefill streams every layer's experts)
  half   llama.cpp keeps the experts of the first half of the MoE layers on the GPU; hybridmoe gets as many slots
  vram   llama.cpp `-ngl 99`; hybridmoe with every expert in a slot
hybridmoe runs with its default settings (prefill chunk sized from free VRAM, streamed prefill; --load adds
options) and is timed as `hybridmoe bench` times ppN: random token ids through the generate loop. The file is the
one bench/offload_vs_llamacpp.py uses ({shape}-uniform.gguf in --dir, written if missing), with 8192 positions so
that a 4096-token prompt fits the engine's context.

Copy rate: the bytes the prefill copied to the GPU (the engine's bytes_copied) over the prefill's wall time, from
one more prompt after the timed ones. Where prefill is bound by PCIe this approaches the pinned H2D rate; its ratio
to that rate is the share of the link the streaming kept busy.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import synthetic  # noqa: E402
import watch  # noqa: E402
from offload_vs_llamacpp import h2d_bandwidth, read_bandwidth  # noqa: E402

import hybridmoe  # noqa: E402
from hybridmoe.engine.bench import BenchOptions, run_bench  # noqa: E402



def llama_bench(exe: str, gguf: Path, args: list[str], prompts: list[int], ubatches: list[int], threads: int,
                reps: int) -> dict:
    """{(n_prompt, n_ubatch): (t/s, std)} from one llama-bench call over every prompt length and micro-batch."""
    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)), "-n", "0",
           "-b", str(max(ubatches)), "-ub", ",".join(map(str, ubatches)), "-r", str(reps), "-o", "json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed: {out.stderr[-2000:]}")
    return {(row["n_prompt"], row["n_ubatch"]): (row["avg_ts"], row["stddev_ts"]) for row in json.loads(out.stdout)
            if row.get("n_prompt")}


def ours(gguf: Path, slots: int | None, prompts: list[int], reps: int, cpu: bool = False,
         quant_gemm: tuple[str, ...] = (), **load_kw) -> dict:
    """hybridmoe with its default settings: ppN as `hybridmoe bench` measures it, then one more prompt of the
    longest length for the copy rate. cpu: the CPU standing in for the GPU (a smoke test without one);
    quant_gemm: block types whose prefill reads the blocks in the grouped product instead of dequantizing first."""
    from gguf import GGMLQuantizationType
    where = dict(accelerator="cpu") if cpu else dict(device="cuda")
    watch.phase(f"hybridmoe: loading {gguf.name}, slots {slots}")
    eng = hybridmoe.load(gguf, context=max(prompts) + 64, expert_cache_slots=slots, **where, **load_kw)
    rt = eng.model.experts
    rt.store.quant_gemm = {GGMLQuantizationType[name] for name in quant_gemm}
    watch.phase("hybridmoe: loaded")
    results = run_bench(eng, BenchOptions(tuple(prompts), (0,), reps), progress=watch.phase)
    res = {f"pp{r.n_prompt}": (r.mean, r.std) for r in results}
    res.update({f"pp{r.n_prompt}_reps": r.samples for r in results})
    rt.take_stats()  # counters of the timed runs are not the copy rate's
    rng = random.Random(1)
    prompt = [rng.randrange(16, eng.args.vocab_size) for _ in range(max(prompts))]
    stats = [e for e in eng.generate(prompt, max_tokens=1, temperature=0.0, ignore_eos=True)
             if isinstance(e, hybridmoe.Stats) and e.phase == "prefill"]
    copied = stats[0].extra.get("bytes_copied", 0) if stats else 0
    seconds = max(prompts) / stats[0].prefill_tok_s if stats and stats[0].prefill_tok_s else float("nan")
    res.update(slots=rt.slots, prefill_chunk=eng.prefill_chunk, bytes_copied=copied, prefill_s=seconds,
               copy_bytes_per_s=copied / seconds if copied else 0.0,
               staging_rows={s: st.rows for s, st in rt.experts.streams.items()})
    del eng, rt
    if not cpu:
        torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench built with CUDA")
    ap.add_argument("--shape", choices=sorted(synthetic.SHAPES), default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 5 for DeepSeek, 48 Qwen)")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where the synthetic GGUF file is kept")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", default="512,4096", help="prompt lengths (default: 512,4096)")
    ap.add_argument("--ubatches", default="512,2048,4096",
                    help="llama.cpp micro-batch sizes (default: 512,2048,4096)")
    ap.add_argument("--only", default="off,half,vram", help="configurations to run")
    ap.add_argument("--skip-llama", action="store_true", help="measure hybridmoe only")
    ap.add_argument("--quant-gemm", default="", help="block types (e.g. Q4_K) whose grouped prefill reads the "
                                                     "blocks in the product instead of dequantizing to bf16 first")
    ap.add_argument("--file", type=Path, default=None,
                    help="an existing GGUF of the shape instead of the synthetic one")
    ap.add_argument("--cpu", action="store_true", help="hybridmoe with the CPU standing in for the GPU (a smoke test "
                                                       "of this script on a machine without one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--load", default="{}", help="extra hybridmoe.load() options as JSON")
    a = ap.parse_args()
    watch.arm()
    if not a.skip_llama and not a.llama_bench:
        ap.error("--llama-bench is required (or --skip-llama)")
    prompts, ubatches = [int(p) for p in a.prompts.split(",")], [int(u) for u in a.ubatches.split(",")]
    load_kw, only = json.loads(a.load), set(a.only.split(","))
    torch.set_num_threads(a.threads)
    from hybridmoe.kernels.cpu import set_threads
    set_threads(a.threads)
    path = a.file or a.dir / f"{a.shape}-uniform.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        synthetic.write(a.shape, path, a.layers, 0.0, progress=False)
        print(f"wrote {path.name}: {path.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - t0:.0f} s",
              flush=True)
    bw, h2d = read_bandwidth(), (h2d_bandwidth() if torch.cuda.is_available() else float("nan"))
    print(f"CPU read {bw / 1e9:.1f} GB/s, pinned H2D {h2d / 1e9:.1f} GB/s", flush=True)
    from hybridmoe.formats.gguf import GGUFFile, hf_config
    cfg = hf_config(GGUFFile(path))
    if max(prompts) + 2 > (cfg.get("max_position_embeddings") or 0):
        ap.error(f"{path} holds {cfg.get('max_position_embeddings')} positions, too few for pp{max(prompts)}; "
                 "delete it (bench/synthetic.py now writes 8192) or pass shorter --prompts")
    n_layers = cfg["num_hidden_layers"]
    moe = [i for i in range(n_layers) if i >= (cfg.get("first_k_dense_replace") or 0)]
    n_exp = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
    gpu_layers = moe[:max(1, len(moe) // 2)]
    cpu_exps = "|".join(str(i) for i in moe if i not in gpu_layers)
    plans = {"off": (["-ngl", "99", "-ot", "exps=CPU"], 0),
             "half": (["-ngl", "99", "-ot", f"blk\\.({cpu_exps})\\.ffn_.*_exps=CPU"], len(gpu_layers) * n_exp),
             "vram": (["-ngl", "99"], None)}
    rows = []
    for name, (largs, slots) in plans.items():
        if name not in only:
            continue
        lb = None if a.skip_llama else llama_bench(a.llama_bench, path, largs, prompts, ubatches, a.threads, a.reps)
        us = ours(path, slots, prompts, a.reps, a.cpu, tuple(t for t in a.quant_gemm.split(",") if t), **load_kw)
        row = dict(config=name, ours=us, llama={f"{p}/{u}": v for (p, u), v in (lb or {}).items()},
                   copy_vs_h2d=us["copy_bytes_per_s"] / h2d)
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = "CPU standing in for the GPU" if a.cpu else torch.cuda.get_device_name()
    print(f"\n{path.name}, {n_layers} layers, {device}, {a.threads} threads, reps {a.reps}; "
          f"pinned H2D {h2d / 1e9:.1f} GB/s")
    head = "".join(f"{'llama -ub ' + str(u):>16}" for u in ubatches)
    print(f"{'config':<7}{'test':<8}{head}{'ours':>16}{'vs best':>9}{'vs -ub ' + str(ubatches[0]):>11}"
          f"{'chunk':>7}{'copy GB/s':>11}{'of H2D':>8}")
    for r in rows:
        us = r["ours"]
        for p in prompts:
            ll = [r["llama"].get(f"{p}/{u}") for u in ubatches]
            cells = "".join(f"{v[0]:>10.1f}±{v[1]:<5.1f}" if v else f"{'-':>16}" for v in ll)
            best = max((v[0] for v in ll if v), default=None)
            mine = us[f"pp{p}"]
            vs_best = f"{mine[0] / best:.2f}" if best else "-"
            vs_default = f"{mine[0] / ll[0][0]:.2f}" if ll[0] else "-"
            copy = f"{us['copy_bytes_per_s'] / 1e9:.1f}" if p == max(prompts) else ""
            share = f"{r['copy_vs_h2d']:.2f}" if p == max(prompts) else ""
            print(f"{r['config']:<7}{'pp' + str(p):<8}{cells}{mine[0]:>10.1f}±{mine[1]:<5.1f}{vs_best:>9}"
                  f"{vs_default:>11}{us['prefill_chunk']:>7}{copy:>11}{share:>8}")
    if a.json:
        a.json.write_text(json.dumps({"bandwidth": bw, "h2d": h2d, "rows": rows,
                                      "median_copy_vs_h2d": statistics.median(r["copy_vs_h2d"] for r in rows)
                                      if rows else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
