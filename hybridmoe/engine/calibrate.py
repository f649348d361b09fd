"""The engine's fixed costs on this machine, for the tuner: decode steps of small twins of a model family, timed
with the same machinery as `hybridmoe bench`.

A twin has the model's family, experts per token, routing groups and block types at small dims (whole blocks),
so its step time is almost all fixed cost: Python, launches, host syncs, kernel calls. Twins with 1 and 4 MoE
layers, each with every expert in a GPU slot and with the cache off, give
  step_s       the intercept (embedding, head, sampling, the loop, the twin's dense layer if the family has one),
  moe_layer_s  the slope per MoE layer with its experts served from slots,
  cpu_expert_s the extra slope per expert served on the CPU instead (its bytes are the tuner's business).
The tuner adds what reading the real model's bytes costs at the measured rates.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..hardware.profile import EngineCosts
from .bench import _Counters, run_once

MOE_LAYERS = (1, 4)


def model_types(model: str | Path) -> tuple[dict, tuple, object]:
    """(config, expert block types of gate/up/down, non-expert type) of a GGUF file or an HF config; HF models
    are timed as their Q4_K_M GGUF would run."""
    from gguf import GGMLQuantizationType as Q

    from ..formats.gguf import GGUFFile, hf_config
    from ..models.loader import read_config
    path = Path(model)
    if path.suffix != ".gguf":
        return read_config(path), (Q.Q4_K, Q.Q4_K, Q.Q4_K), Q.Q8_0
    f = GGUFFile(path)
    cfg = hf_config(f)
    first = min(int(n.split(".")[1]) for n in f.tensors if "_exps." in n)
    types = tuple(f.tensors[f"blk.{first}.ffn_{p}_exps.weight"].qtype for p in ("gate", "up", "down"))
    return cfg, types, Q.Q8_0


def _step_s(engine, tokens: int, reps: int) -> float:
    """Median seconds per decode step over `reps` generations of `tokens` tokens, after one warm-up."""
    run_once(engine, [20], min(tokens, 8), _Counters())
    rates = [run_once(engine, [20], tokens, _Counters())[1] for _ in range(reps)]
    return 1.0 / statistics.median(rates)


def measure(model: str | Path, accelerator: str, tokens: int = 32, reps: int = 5, progress=None) -> EngineCosts:
    """Time the twins of `model` on `accelerator` ("cuda" or "cpu") with the kernels' current thread count."""
    import numba

    from .engine import load
    cfg, types, other = model_types(model)
    say = progress or (lambda s: None)
    device = "cuda" if accelerator == "cuda" else "cpu"
    times: dict[tuple[int, bool], float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from ..models.synthetic import write_twin
        for n in MOE_LAYERS:
            path = write_twin(cfg, n, Path(tmp) / f"twin{n}.gguf", types, other)
            for cached in (True, False):
                engine = load(path, device=device, accelerator=accelerator, expert_cache_slots=None if cached else 0,
                              prefetch=False)
                times[(n, cached)] = _step_s(engine, tokens, reps)
                del engine
                if device == "cuda":
                    torch.cuda.empty_cache()
    a, b = MOE_LAYERS
    slope = (times[(b, True)] - times[(a, True)]) / (b - a)
    slope_cpu = (times[(b, False)] - times[(a, False)]) / (b - a)
    top_k = cfg.get("num_experts_per_tok") or 1
    costs = EngineCosts(accelerator, cfg["model_type"], step_s=max(0.0, times[(a, True)] - a * slope),
                        moe_layer_s=max(0.0, slope), cpu_expert_s=max(0.0, (slope_cpu - slope) / top_k),
                        threads=numba.get_num_threads())
    say(f"engine on {accelerator} ({cfg['model_type']} twins, {time.perf_counter() - t0:.0f} s): "
        f"{1e3 * costs.step_s:.2f} ms per step, {1e3 * costs.moe_layer_s:.2f} ms per MoE layer, "
        f"{1e6 * costs.cpu_expert_s:.0f} us more per CPU-served expert")
    return costs
