"""What `hybridmoe tune` and `plan --profile` do, kept out of cli.py: probe or read the machine, measure or look
up the cost constants, tune a plan for the model, explain it and write the profile."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ..offload.plan import Hardware
from ..offload.scheduler import CostModel
from . import microbench, profile as profiles
from .probe import Machine, probe, probe_machine
from .profile import EngineCosts, Meta, PlanSpec, Profile


def plan_hardware(spec: str | None) -> Hardware:
    """Hardware for `hybridmoe plan`: the profile's (--profile NAME|FILE|auto), else this machine's."""
    return profiles.resolve(spec).hardware_for_plan() if spec else probe()


@dataclass(slots=True)
class TuneRequest:
    model: str | None = None
    output: str | None = None
    quick: bool = False
    profile: str | None = None  # tune for the machine this profile describes
    context: int | None = None
    dtype: str | None = None  # None: bfloat16 with a GPU, float32 without (as the engine loads)
    quant: str | None = None
    budget_s: float = 60.0
    progress: bool = True

    def __post_init__(self):
        if not 1 <= self.budget_s <= 600:
            raise ValueError("--budget must be between 1 and 600 seconds")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def _default_name(m: Machine | None, base: Profile | None) -> str:
    if m is None:
        return f"{base.profile.name}-tuned" if base else "tuned"
    if not m.gpus:
        return "cpu-only-tuned"
    names = {g.name for g in m.gpus}
    label = names.pop() if len(names) == 1 else "mixed"
    return f"{_slug(label.replace('NVIDIA', ''))}-x{len(m.gpus)}"


def _constants(req: TuneRequest, machine: Machine | None, base: Profile | None, cfg: dict | None, gguf: bool,
               say) -> tuple[CostModel, str, str, "microbench.Measurements | None"]:
    """(cost model, source, how, the measurements if any were made)."""
    if req.quick or machine is None:  # a described machine (--profile) is not this one: nothing to measure
        if base is not None:
            return base.cost, base.profile.source, f"--quick: constants from profile {base.profile.name}", None
        return CostModel(), "estimate", "--quick: default constants (no profile matched)", None
    dims = microbench.ExpertDims()
    if cfg is not None:
        from ..models.loader import model_args
        inter, dim = model_args(cfg)[1].expert_shape
        dims = microbench.ExpertDims(dim, inter)
    dtype = req.dtype or ("bfloat16" if machine is not None and machine.gpus else "float32")
    say(f"measuring ({req.budget_s:.0f} s at most; experts of {dims.dim}x{dims.inter}, {dtype})")
    m = microbench.run(microbench.BenchSettings(dims, dtype, req.budget_s, disk_path=req.model,
                                                progress=req.progress))
    for note in m.notes:
        say(f"note: {note}")
    cost = m.cost_model(base.cost if base else None, quantized=gguf)
    kernel = "Q4_K kernel" if gguf and m.cpu_quant_bytes_per_s else dtype
    how = f"hybridmoe tune on {date.today().isoformat()}: microbenchmarks, experts {dims.dim}x{dims.inter} {kernel}"
    missing = [k for k in ("h2d_bytes_per_s", "gpu_bytes_per_s", "gpu_flops", "launch_s") if not getattr(m, k)]
    if missing:
        how += f"; {', '.join(missing)} not measured (from {base.profile.name if base else 'defaults'})"
    return cost, "measured", how, m


def engine_costs(req: TuneRequest, machine: Machine | None, base: Profile | None, got, measure_engine,
                 say) -> EngineCosts | None:
    """The engine's fixed costs for the model's family: timed now (measure_engine(model, accelerator)) when this
    machine is measured, else the base profile's if it has them."""
    if machine is not None and not req.quick and req.model and measure_engine is not None:
        try:
            eng = measure_engine(req.model, "cuda" if machine.gpus else "cpu")
        except Exception as e:  # a failed measurement must not stop tuning; the tuner falls back to launch counts
            say(f"note: engine costs not measured ({type(e).__name__}: {e})")
            return None
        if got is not None:
            eng.cpu_expert_bytes_per_s = got.cpu_quant_raw_bytes_per_s or got.cpu_bytes_per_s or 0.0
            eng.cpu_layer_bytes_per_s = got.cpu_layer_bytes_per_s or 0.0
        return eng
    return base.engine if base is not None and base.engine.measured else None


def run_tune(req: TuneRequest, out=print, say=None, measure_engine=None) -> Path:
    """Tune, print the explanation table, write the profile; returns its path. measure_engine(model, accelerator)
    -> EngineCosts times the engine's own fixed costs (hybridmoe.engine.calibrate.measure)."""
    from .tune import TuneOptions, expert_flops, footprint_for, format_rows, tune
    say = say or (lambda s: print(s, file=sys.stderr))
    machine, base = None, None
    if req.profile:
        base = profiles.resolve(req.profile)
        out(f"machine: as profile {base.profile.name} describes it ({base.profile.source})")
    else:
        machine = probe_machine(req.model)
        for line in machine.describe():
            out(line)
        base = profiles.matching(machine)
    gpus = bool(machine.gpus) if machine is not None else bool(base.hardware.gpus)
    fp = cfg = None
    if req.model:
        fp, cfg = footprint_for(req.model, req.dtype or ("bfloat16" if gpus else "float32"), req.quant,
                                layers_as_stored=not gpus)
    gguf = bool(req.model) and Path(req.model).suffix == ".gguf"
    cost, source, how, got = _constants(req, machine, base, cfg, gguf, say)
    spec = base.hardware if machine is None else profiles.spec_from_machine(
        machine, base.hardware.disk_read_bytes_per_s if base else None)
    if machine is not None and base is not None:
        spec.h2d_pageable_bytes_per_s = base.hardware.h2d_pageable_bytes_per_s
    if got is not None and got.disk_read_bytes_per_s:
        spec.disk_read_bytes_per_s = got.disk_read_bytes_per_s
    if got is not None and got.h2d_pageable_bytes_per_s:
        spec.h2d_pageable_bytes_per_s = got.h2d_pageable_bytes_per_s
    eng = engine_costs(req, machine, base, got, measure_engine, say) if fp is not None else None
    prof = Profile(Meta("", source, created=date.today().isoformat(), how=how), spec, cost, PlanSpec(),
                   eng or EngineCosts())
    if fp is not None:
        hw = prof.hardware_for_plan()
        # mmap-tier copies run at the measured pageable rate where known, else about half the pinned one
        pageable = min(1.0, spec.h2d_pageable_bytes_per_s / cost.h2d_bytes_per_s) or 0.5
        result = tune(fp, hw, cost, expert_flops(cfg), int(cfg.get("max_position_embeddings") or 4096),
                      TuneOptions(context=req.context, pageable_factor=pageable,
                                  cpu_curve=got.cpu_by_threads if got else {}, engine=eng))
        out(f"\nplan for {Path(req.model).name} ({fp.expert_host_total / 2 ** 30:.2f} GiB of routed experts):")
        out(format_rows(result.rows))
        for note in result.notes:
            out(f"note: {note}")
        ch = result.choice
        prof.plan = PlanSpec(Path(req.model).name, ch.plan.context, ch.prediction.batch, len(ch.plan.devices),
                             tuple(d.expert_slots for d in ch.plan.devices), ch.tier, ch.threads, ch.margin,
                             round(ch.prediction.tok_s, 2))
    name = Path(req.output).stem if req.output else _default_name(machine, base)
    prof.profile.name = name
    prof.profile.description = (f"tuned for {Path(req.model).name}" if req.model else "this machine's rates")
    path = Path(req.output) if req.output else Path(f"{name}.toml")
    shipped = path.resolve().parent == profiles.PROFILES_DIR
    use = f"hybridmoe plan MODEL --profile {name if shipped else path}"
    profiles.save(prof, path, header=[f"hybridmoe hardware profile '{name}', written by `hybridmoe tune` on "
                                      f"{date.today().isoformat()}.",
                                      f"source = {source}: {how}.",
                                      f"Use it with: {use}"],
                  comments={"cost": "bytes/s, FLOP/s and seconds, as the offload scheduler's CostModel reads them",
                            "plan": "what `hybridmoe tune` chose, and the decode speed it predicts",
                            "engine": "the engine's own costs per decode step, MoE layer and CPU-served expert (timed "
                                      "on small twins of the model), and the CPU kernels' rates; seconds, bytes/s"})
    out(f"wrote {path}")
    return path
