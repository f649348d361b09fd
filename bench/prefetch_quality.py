"""Prefetch quality on a model with trained routing (the demo model by default): per MoE layer, the share of the
experts a decode step used that the router-predicted prefetch had named in its top k and in its top k + margin,
and the share of the named ones that were used (precision). Random guessing would give k/E and (k + margin)/E.

    python bench/prefetch_quality.py [MODEL] [--margin 2] [--slots 8] [--tokens 48]

The offload engine runs with the CPU standing in for the GPU (accelerator = cpu); a small expert cache makes the
prefetcher active. Chat prompts about the standard library (what the demo model was trained on) and a few others.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hybridmoe  # noqa: E402
from common import run  # noqa: E402

PROMPTS = ["What does `json.dumps` do?", "Explain `textwrap.wrap`.", "What is the `heapq` module?",
           "How do I use os.path.join?", "Tell me about collections.OrderedDict.", "Hello",
           "What does `urllib.parse.urlparse` do?", "Write a haiku about the sea."]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model directory or GGUF (default: the demo model)")
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8, help="expert cache slots (must be below the expert count)")
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    def run(prefetch: bool):
        eng = hybridmoe.load(a.model, accelerator="cpu", expert_cache_slots=a.slots, prefetch=prefetch,
                             prefetch_margin=a.margin)
        last, hits, total, copied = None, 0, 0, 0
        for prompt in PROMPTS:
            for ev in eng.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=a.tokens):
                if isinstance(ev, hybridmoe.Stats) and ev.phase == "decode":
                    hits += ev.extra.get("cache_hits", 0)
                    total += ev.extra.get("cache_hits", 0) + ev.extra.get("cache_misses", 0)
                    copied += ev.extra.get("bytes_copied", 0)
                    last = ev.extra.get("prefetch", last)
        return eng, last, hits / max(1, total), copied

    _, _, hit_off, copied_off = run(False)
    eng, last, hit_on, copied_on = run(True)
    if not last:
        print("no prefetch statistics: is the cache smaller than the experts, and prefetch on?")
        return 1
    model = eng.model
    ffn = model.layers[model.moe_layers()[0]].ffn
    E, k = ffn.spec.n_experts, ffn.spec.top_k
    print(f"{eng.path.name}: {E} experts, top-{k}, margin {a.margin}, {a.slots} slots; "
          f"random guessing: recall@k {k / E:.2f}, recall@k+m {(k + a.margin) / E:.2f}")
    print(f"{'layer':>5}{'steps':>7}{'recall@k':>10}{'recall@k+m':>12}{'precision':>11}")
    for layer, q in sorted(last.items()):
        print(f"{layer:>5}{q['steps']:>7}{q['recall_k']:>10.2f}{q['recall_k_margin']:>12.2f}{q['precision']:>11.2f}")
    print(f"decode cache hit rate {hit_on:.2f} with prefetch, {hit_off:.2f} without; expert bytes copied "
          f"{copied_on / 2**20:.0f} MiB with prefetch, {copied_off / 2**20:.0f} MiB without")
    return 0


if __name__ == "__main__":
    run(main)
