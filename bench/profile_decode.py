"""Where a decode step's time goes: cProfile of hybridmoe generating tokens on a GGUF file.

    python bench/profile_decode.py MODEL.gguf [--slots N] [--tokens 24] [--device cuda]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hybridmoe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    t0 = time.perf_counter()
    eng = hybridmoe.load(a.model, device=a.device, context=256, expert_cache_slots=a.slots, prefetch=False)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    list(eng.generate([5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    list(eng.generate([5, 6, 7], max_tokens=a.tokens, temperature=0, ignore_eos=True))
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"{a.tokens / dt:.1f} tok/s ({1000 * dt / a.tokens:.1f} ms/token), slots {a.slots}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
