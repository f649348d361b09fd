"""Decode through CUDA graphs against eager decode, on a real GPU (one or more): tiny HF checkpoints and their
Q8_0 GGUF conversion, expert cache full (GGUF: experts run inside the graphs), partial and off, 1 or N GPUs.

Per configuration: teacher-forced one-token steps through the graphs and eagerly, each compared with the same
engine's full-sequence logits (relative error = max |diff| / max |full|), and greedy tokens of graphs vs eager.

    python bench/gpu_graphs_check.py [--devices 1,2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "gguf")]

import torch  # noqa: E402

import gguf_helpers as H  # noqa: E402
import hybridmoe  # noqa: E402
from hybridmoe.models.convert import convert  # noqa: E402
from hybridmoe.layers.cache import Batch  # noqa: E402


def stepwise(eng, ids: list[int]) -> torch.Tensor:
    model = eng.model
    cache = model.new_cache(1, 256)
    out = []
    with torch.inference_mode():
        for pos, t in enumerate(ids):
            batch = Batch.make([pos], [1], [0], eng.device)
            out.append(model(torch.tensor([[t]], device=eng.device), batch, cache, last_only=True).float().cpu())
    return torch.cat(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1", help="comma-separated GPU counts to split the layers over")
    a = ap.parse_args()
    counts = [n for n in map(int, a.devices.split(",")) if n <= torch.cuda.device_count()]
    ids = list(range(20, 100))  # crosses the first key window (64)
    print(f"{'model':<22}{'dtype':<10}{'slots':>6}{'gpus':>5}{'graphs vs full':>15}{'eager vs full':>14}"
          f"{'greedy same':>12}{'captured':>9}{'resident':>9}", flush=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("deepseek_v3", "qwen3_moe"):
            hf = H.build_hf(family, Path(tmp) / family)
            q4 = convert(hf, Path(tmp) / f"{family}-q8_0.gguf", "q8_0", progress=False)
            for src, label in ((hf, family), (q4, f"{family} q8_0")):
                for dtype in ("float32", "bfloat16"):
                    for slots in (None, 4, 0):
                        for n in counts:
                            kw = dict(device="cuda", dtype=dtype, expert_cache_slots=slots, devices=n,
                                      prefetch=slots == 4)
                            graphed = hybridmoe.load(src, **kw)
                            eager = hybridmoe.load(src, cuda_graphs=False, **kw)
                            full = eager.logits(ids).float().cpu()
                            g, e = stepwise(graphed, ids), stepwise(eager, ids)
                            tg = list(graphed.generate(ids[:8], temperature=0, max_tokens=32, ignore_eos=True))
                            te = list(eager.generate(ids[:8], temperature=0, max_tokens=32, ignore_eos=True))
                            same = sum(x == y for x, y in zip(tg[-1].token_ids, te[-1].token_ids)) / 32
                            graphs = graphed.model.decode_graphs
                            resident = len(graphed.model.experts.experts.resident_slots)
                            err_g, err_e = rel(g, full), rel(e, full)
                            bad += not graphs.enabled or err_g > max(2 * err_e, 1e-4 if dtype == "float32" else 0.1)
                            print(f"{label:<22}{dtype:<10}{str(slots):>6}{n:>5}{err_g:>15.2e}{err_e:>14.2e}"
                                  f"{same:>12.2f}{graphs.captured:>9}{resident:>9}"
                                  f"{'' if graphs.enabled else '  ' + str(graphs.failure)}", flush=True)
                            del graphed, eager
                            torch.cuda.empty_cache()
    print(f"{bad} configuration(s) where graphs were off or clearly worse than eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
