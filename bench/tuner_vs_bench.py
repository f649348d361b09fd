"""The tuner's predicted decode speed against what `hybridmoe bench` measures, for the tuned plan and three
alternatives a user would plausibly try, in one run on one machine.

    python bench/tuner_vs_bench.py MODEL.gguf [--profile P] [--accelerator cuda|cpu] [--tokens N] [--reps R]
                                   [--json OUT]

1. The machine's profile: --profile (a name in profiles/ or a TOML file), else `hybridmoe tune` runs now (probe,
   microbenchmarks, the engine's fixed costs on small twins of MODEL) and writes --save-profile if given. If the
   profile's engine costs were timed for another model family or accelerator, they are timed again now.
2. The tuner's plan for MODEL at batch 1 and --ctx: expert slots, host tier, prefetch margin, CPU threads, and its
   predicted decode tok/s. With --accelerator cpu the CPU stands in for one GPU whose "VRAM" is --sim-vram.
3. Alternatives: the expert cache off; half the tuned slots with the prefetch margin the tuner would pick for them;
   the same without prefetch. (If the tuned plan caches no expert: as many slots as fit, and half of those.)
4. Each plan is loaded exactly as planned and timed with `hybridmoe bench`'s machinery (tgN: one-token prompt,
   N generated tokens, R repetitions after a warm-up). Predictions are made for that run's KV fill (1 + N/2).

Noise: a plan counts as at least as fast as another when its mean is no lower than the other's minus
max(2 * sqrt(std_a^2 + std_b^2), 2% of the other's mean), std over the repetitions. The exit code is 0 whenever the
measurements ran, goals met or not: this is a measurement, not a test.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from hybridmoe.engine.bench import BenchOptions, run_bench  # noqa: E402
from hybridmoe.hardware import profile as profiles  # noqa: E402
from hybridmoe.hardware.profile import Profile  # noqa: E402
from hybridmoe.hardware.tune import (TuneOptions, expert_flops, footprint_for, format_rows, predict,  # noqa: E402
                                     tune)
from hybridmoe.offload.plan import GPU, GiB, PlanOptions, make_plan  # noqa: E402

TOLERANCE = 0.25  # the goal: measured within +-25% of predicted
NOISE_FLOOR = 0.02


@dataclass(slots=True)
class PlanRun:
    name: str
    slots: int  # per device
    tier: str
    margin: int  # 0: no prefetch
    threads: int
    predicted_tok_s: float = 0.0
    predicted_hit_rate: float = 0.0
    samples: list[float] = field(default_factory=list)
    measured_tok_s: float = 0.0
    measured_std: float = 0.0
    cache_hit_rate: float | None = None
    prefetch_recall: float | None = None
    load_s: float = 0.0
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.measured_tok_s / self.predicted_tok_s if self.predicted_tok_s else math.nan


def at_least_as_fast(a: PlanRun, b: PlanRun) -> bool:
    """a >= b within the noise of the two measurements (see the module docstring)."""
    noise = max(2 * math.hypot(a.measured_std, b.measured_std), NOISE_FLOOR * b.measured_tok_s)
    return a.measured_tok_s >= b.measured_tok_s - noise


def get_profile(a, say) -> Profile:
    if a.profile:
        prof = profiles.resolve(a.profile)
        say(f"profile: {a.profile} ({prof.profile.source}, {prof.profile.how or prof.profile.description})")
        return prof
    import tempfile

    from hybridmoe.engine.calibrate import measure
    from hybridmoe.hardware.commands import TuneRequest, run_tune
    out = a.save_profile or str(Path(tempfile.mkdtemp()) / "machine.toml")
    say("profile: measuring this machine now (hybridmoe tune)")
    path = run_tune(TuneRequest(str(a.model), out, budget_s=a.budget, context=a.ctx), out=say,
                    measure_engine=lambda model, acc: measure(model, acc, progress=say))
    return profiles.load(path)


def engine_costs(prof: Profile, a, say):
    """The profile's engine costs if they were timed for this family and accelerator, else timed now."""
    from hybridmoe.engine.calibrate import model_types, measure
    family = model_types(a.model)[0]["model_type"]
    eng = prof.engine
    if eng.measured and eng.family == family and eng.accelerator == a.accelerator:
        return eng
    say(f"engine costs: the profile has them for {eng.family or 'no family'} on {eng.accelerator or '-'}; "
        f"timing {family} on {a.accelerator} now")
    try:
        new = measure(a.model, a.accelerator, progress=say)
    except Exception as e:  # go on with what the profile has; the table shows how far off that is
        say(f"engine costs: timing failed ({type(e).__name__}: {e}); using the profile's")
        return eng
    new.cpu_expert_bytes_per_s = eng.cpu_expert_bytes_per_s or prof.cost.cpu_bytes_per_s
    new.cpu_layer_bytes_per_s = eng.cpu_layer_bytes_per_s
    return new


def machine_for(prof: Profile, a):
    """(Hardware, CostModel) for the tuner. With --accelerator cpu, one simulated GPU of --sim-vram GiB whose
    copies run at the CPU's read rate."""
    hw, cost = prof.hardware_for_plan(), prof.cost
    if a.accelerator == "cpu":
        vram = int(a.sim_vram * GiB)
        hw = replace(hw, gpus=(GPU("CPU standing in for a GPU", vram, vram),))
        cost = replace(cost, h2d_bytes_per_s=cost.cpu_bytes_per_s)
    elif not hw.gpus:
        raise SystemExit("error: the profile describes no GPU; use --accelerator cpu or a GPU machine's profile")
    return replace(hw, gpus=hw.gpus[:1]), cost


def plans_to_try(fp, hw, cost, opts, flops, tuned, fill, cpu_bw) -> list[PlanRun]:
    """The tuned plan and three alternatives, each with the tuner's prediction for this run's KV fill."""
    ch = tuned.choice
    slots = ch.plan.devices[0].expert_slots
    total = sum(fp.experts_per_layer)
    fit = make_plan(fp, hw, PlanOptions(ch.plan.context, 1, experts_tier=ch.tier)).devices[0].expert_slots
    half = max(1, (slots or fit) // 2)

    def best_margin(n: int, tier: str) -> int:
        plan = make_plan(fp, hw, PlanOptions(ch.plan.context, 1, experts_tier=tier, max_slots=n))
        if not 0 < plan.experts["cache_slots_total"] < total:
            return 0
        preds = {m: predict(fp, hw, cost, plan, tier, m, cpu_bw, flops, opts, 1, fill).tok_s for m in opts.margins}
        return max(preds, key=lambda m: (preds[m], -m))
    runs = [PlanRun("tuned", slots, ch.tier, ch.margin, ch.threads),
            PlanRun("cache off" if slots else "as many slots as fit", 0 if slots else fit, ch.tier, 0, ch.threads)]
    m = best_margin(half, ch.tier) or 2
    runs.append(PlanRun(f"half the slots, prefetch k+{m}", half, ch.tier, m, ch.threads))
    runs.append(PlanRun("half the slots, no prefetch", half, ch.tier, 0, ch.threads))
    for r in runs:
        plan = make_plan(fp, hw, PlanOptions(ch.plan.context, 1, experts_tier=r.tier, max_slots=r.slots))
        pred = predict(fp, hw, cost, plan, r.tier, r.margin, cpu_bw, flops, opts, 1, fill)
        r.slots = plan.devices[0].expert_slots
        r.predicted_tok_s, r.predicted_hit_rate = pred.tok_s, pred.hit_rate
    return runs


def measure_plan(r: PlanRun, a, cost, say) -> None:
    import hybridmoe
    from hybridmoe.kernels import cpu as ck
    ck.set_threads(r.threads)
    torch.set_num_threads(r.threads)
    device = "cuda" if a.accelerator == "cuda" else "cpu"
    engine = None
    try:
        t0 = time.perf_counter()
        engine = hybridmoe.load(a.model, device=device, context=a.ctx, accelerator=a.accelerator,
                                expert_cache_slots=r.slots, prefetch=r.margin > 0, prefetch_margin=max(1, r.margin),
                                experts_tier=r.tier, cost_model=cost)
        r.load_s = time.perf_counter() - t0
        got = engine.model.experts.slots[0]
        if got != r.slots:
            say(f"  note: the engine made {got} slots, not {r.slots} (GPU memory)")
            r.slots = got
        res = run_bench(engine, BenchOptions((0,), (a.tokens,), a.reps),
                        progress=lambda s: say(f"  {r.name}: {s}"))[0]
        r.samples, r.measured_tok_s, r.measured_std = res.samples, res.mean, res.std
        r.cache_hit_rate, r.prefetch_recall = res.cache_hit_rate, res.prefetch_recall
    except Exception as e:  # report the failure and go on with the other plans
        r.error = f"{type(e).__name__}: {e}"
        say(f"  {r.name}: failed ({r.error})")
    finally:
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def table(runs: list[PlanRun]) -> str:
    head = ["plan", "slots", "tier", "prefetch", "threads", "predicted t/s", "measured t/s", "measured/predicted",
            "cache hit (pred / meas)", "tuned >= it"]
    rows = []
    for r in runs:
        hit = "-" if r.cache_hit_rate is None else f"{100 * r.cache_hit_rate:.0f}%"
        ge = "-" if r is runs[0] else ("yes" if at_least_as_fast(runs[0], r) else "NO")
        meas = "failed" if r.error else f"{r.measured_tok_s:.2f} ± {r.measured_std:.2f}"
        rows.append([r.name, str(r.slots), r.tier, f"k+{r.margin}" if r.margin else "off", str(r.threads),
                     f"{r.predicted_tok_s:.2f}", meas, "-" if r.error else f"{r.ratio:.2f}",
                     f"{100 * r.predicted_hit_rate:.0f}% / {hit}", ge])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="GGUF file")
    ap.add_argument("--profile", default=None, help="profile name or TOML file (default: measure this machine now)")
    ap.add_argument("--save-profile", default=None, help="where to write the profile measured now")
    ap.add_argument("--accelerator", choices=("cuda", "cpu"), default=None,
                    help="default: cuda if a GPU is visible, else cpu (the CPU standing in for the GPU)")
    ap.add_argument("--sim-vram", type=float, default=None,
                    help="with --accelerator cpu: GiB of the simulated GPU (default: half the experts' bytes, "
                         "so that the cache cannot hold every expert)")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per repetition (default: 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per plan (default: 3)")
    ap.add_argument("--ctx", type=int, default=4096, help="context of the plans and the engine (default: 4096)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of microbenchmarks when measuring now")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.accelerator = a.accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()

    prof = get_profile(a, say)
    eng = engine_costs(prof, a, say)
    on_cpu = a.accelerator == "cpu"
    fp, cfg = footprint_for(a.model, "float32" if on_cpu else "bfloat16", layers_as_stored=on_cpu)
    if on_cpu and a.sim_vram is None:  # weights, KV and half the experts, with make_plan's reserve and margin
        po = PlanOptions()
        need = sum(fp.layer_bytes) + fp.embed_bytes + fp.head_bytes + sum(fp.kv_bytes_per_token) * a.ctx
        a.sim_vram = ((need + fp.expert_host_total / 2 + po.vram_reserve) / (1 - po.vram_margin)) / GiB
    hw, cost = machine_for(prof, a)
    opts = TuneOptions(context=a.ctx, batch=1, engine=eng,
                       pageable_factor=min(1.0, prof.hardware.h2d_pageable_bytes_per_s / cost.h2d_bytes_per_s) or 0.5)
    flops = expert_flops(cfg)
    tuned = tune(fp, hw, cost, flops, int(cfg.get("max_position_embeddings") or 4096), opts)
    print(f"tuner's plan for {a.model.name} on {hw.gpus[0].name}" + (" (simulated)" if on_cpu else "") + ":")
    print(format_rows(tuned.rows))
    fill = 1 + a.tokens // 2
    cpu_bw = eng.cpu_expert_bytes_per_s or cost.cpu_bytes_per_s
    runs = plans_to_try(fp, hw, cost, opts, flops, tuned, fill, cpu_bw)
    for r in runs:
        say(f"plan '{r.name}': {r.slots} slots, {r.tier}, prefetch {r.margin or 'off'}, {r.threads} threads")
        measure_plan(r, a, cost, say)

    print()
    print(table(runs))
    t = runs[0]
    ok_pred = not t.error and abs(t.ratio - 1) <= TOLERANCE
    beats = [at_least_as_fast(t, r) for r in runs[1:] if not r.error]
    print(f"\nengine costs ({eng.accelerator}, {eng.family}): {1e3 * eng.step_s:.2f} ms per step, "
          f"{1e3 * eng.moe_layer_s:.2f} ms per MoE layer, {1e6 * eng.cpu_expert_s:.0f} us per CPU-served expert; "
          f"CPU experts at {cpu_bw / 1e9:.1f} GB/s")
    print(f"prediction of the tuned plan: measured/predicted {t.ratio:.2f} -> "
          f"{'within' if ok_pred else 'OUTSIDE'} ±{100 * TOLERANCE:.0f}%")
    print(f"tuned plan at least as fast as each alternative (within noise): "
          f"{'yes' if beats and all(beats) else 'NO'} ({sum(beats)} of {len(runs) - 1})")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "model": str(a.model), "accelerator": a.accelerator, "profile": prof.profile.name,
            "engine": asdict(eng), "tokens": a.tokens, "reps": a.reps, "context": a.ctx, "kv_fill": fill,
            "tuner_rows": tuned.rows, "plans": [asdict(r) | {"ratio": r.ratio} for r in runs],
            "prediction_within_tolerance": ok_pred, "tuned_at_least_as_fast": bool(beats) and all(beats),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
