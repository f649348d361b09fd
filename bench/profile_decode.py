"""Where a decode step's time goes: cProfile (host Python) and optionally torch.profiler (kernels) of hybridmoe
generating tokens on a GGUF file. With --prompt N, the same for a prefill of N tokens (one token generated), each
of --reps runs timed.

    python bench/profile_decode.py MODEL.gguf [--slots N] [--tokens 24] [--device cuda] [--kernels]
    python bench/profile_decode.py MODEL.gguf --prompt 512 --reps 4 --kernels
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import hybridmoe  # noqa: E402
from common import run  # noqa: E402
from hybridmoe.offload.scheduler import CostModel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots per GPU (default: the plan's)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--accelerator", default=None, choices=("cpu", "cuda"), help="cpu: the CPU stands in for a GPU")
    ap.add_argument("--tier", default="pinned", choices=["pinned", "mmap"])
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kernels", action="store_true", help="also a torch.profiler table of operators and kernels")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--cpu-activations", default="int8-all", choices=("f32", "int8", "int8-all"))
    ap.add_argument("--prompt", type=int, default=0, help="profile a prefill of this many tokens instead")
    ap.add_argument("--reps", type=int, default=1, help="timed runs (each printed)")
    ap.add_argument("--cpu-gbs", type=float, default=None, help="cost model: CPU expert read rate (GB/s)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    cost = CostModel(cpu_bytes_per_s=a.cpu_gbs * 1e9, h2d_bytes_per_s=50e9) if a.cpu_gbs else None
    where = {"accelerator": a.accelerator} if a.accelerator else {}
    eng = hybridmoe.load(a.model, device=a.device, dtype="bfloat16", context=max(256, a.prompt + 64),
                         expert_cache_slots=a.slots, prefetch=not a.no_prefetch, experts_tier=a.tier,
                         cpu_repack=a.tier == "pinned", cost_model=cost, cuda_graphs=not a.no_cuda_graphs,
                         cpu_activations=a.cpu_activations, **where)
    if a.tier == "pinned" and hasattr(eng.model.experts, "store"):
        eng.model.experts.store.prepack()
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    vocab = eng.model.tok_embeddings.weight.shape[0]
    prompt = (torch.randint(8, min(vocab, 32000), (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
              if a.prompt else [5])  # one token: its step is a decode step too, so tables hold decode only
    if a.prompt:
        a.tokens = 1

    seen = {"hits": 0, "misses": 0, "copied": 0, "steps": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        events = list(eng.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))
        dt = time.perf_counter() - t0
        for e in events[1:]:
            if isinstance(e, hybridmoe.Stats) and e.phase == "decode":
                seen["hits"] += e.extra.get("cache_hits", 0)
                seen["misses"] += e.extra.get("cache_misses", 0)
                seen["copied"] += e.extra.get("bytes_copied", 0)
                seen["steps"] += 1
        return dt

    run(4)
    graphs = eng.model.decode_graphs
    for r in range(a.reps):
        dt = run(a.tokens)
        what = (f"prefill {a.prompt / dt:.1f} tok/s ({1000 * dt:.1f} ms)" if a.prompt else
                f"{a.tokens / dt:.1f} tok/s ({1000 * dt / a.tokens:.1f} ms/token)")
        state = "off" if graphs is None else f"captured {graphs.captured}, enabled {graphs.enabled} {graphs.failure}"
        print(f"run {r}: {what}, slots {a.slots}, graphs {state}", flush=True)
    if seen["hits"] + seen["misses"]:
        print(f"decode steps {seen['steps']}: hit rate {seen['hits'] / max(1, seen['hits'] + seen['misses']):.2f}, "
              f"{seen['misses'] / seen['steps']:.1f} misses and {seen['copied'] / seen['steps'] / 1e6:.1f} MB copied "
              "per step", flush=True)
    if not a.no_cprofile:
        prof = cProfile.Profile()
        prof.enable()
        dt = run(a.tokens)
        prof.disable()
        print(f"under cProfile: {(a.prompt or a.tokens) / dt:.1f} tok/s")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    if a.kernels:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if a.device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as p:
            run(a.tokens)
        key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=a.top, max_name_column_width=60))
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=a.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    run(main)
