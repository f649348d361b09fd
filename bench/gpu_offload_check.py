"""The offload engine on a real GPU: logits and greedy tokens with the expert cache off, partial and full, prefetch
on and off, and both host tiers, against the model with every expert resident on the GPU. On the CPU these agree
bit for bit; on a GPU, CPU-served experts round differently, so this reports the size of the difference.

    python bench/gpu_offload_check.py [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tiny  # noqa: E402

import hybridmoe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    ids = list(range(20, 84))
    print(f"{'model':<12}{'dtype':<10}{'slots':>6}{'prefetch':>9}{'tier':>8}{'rel err':>10}{'greedy same':>12}"
          f"{'hit rate':>9}{'recall':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("deepseek_v3", "qwen3_moe"):
            path = tiny.BUILDERS[name](Path(tmp) / name)
            ref_eng = hybridmoe.load(path, device="cuda", dtype=args.dtype, expert_cache_slots=None)
            ref = ref_eng.logits(ids)
            ref_tok = list(ref_eng.generate(ids[:8], temperature=0, max_tokens=32, ignore_eos=True))[-1].token_ids
            for slots in (0, 4, 12):
                for prefetch in (True, False):
                    for tier in ("mmap", "pinned"):
                        eng = hybridmoe.load(path, device="cuda", dtype=args.dtype, expert_cache_slots=slots,
                                             prefetch=prefetch, experts_tier=tier)
                        err = ((eng.logits(ids) - ref).abs().max() / ref.abs().max()).item()
                        events = list(eng.generate(ids[:8], temperature=0, max_tokens=32, ignore_eos=True))
                        same = sum(a == b for a, b in zip(events[-1].token_ids, ref_tok)) / 32
                        extra = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
                        hits = sum(x["cache_hits"] for x in extra)
                        total = hits + sum(x["cache_misses"] for x in extra)
                        recall = [x["prefetch_recall"] for x in extra if "prefetch_recall" in x]
                        print(f"{name:<12}{args.dtype:<10}{slots:>6}{str(prefetch):>9}{tier:>8}{err:>10.2e}"
                              f"{same:>12.2f}{hits / max(1, total):>9.2f}"
                              f"{(recall[-1] if recall else float('nan')):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
