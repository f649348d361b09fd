"""The auto-tuner: the plan that maximises predicted decode tokens/s within the machine's memory, with margins.

Predicted time of one decode step, layer by layer: the GPU reads the layer's non-expert weights and KV cache at
its memory rate; of the experts the router picks (top_k per token), those in a GPU slot run there and the rest run
on the CPU at its read rate, overlapped with the GPU's share. With uniform routing the hit rate is the cached
fraction of experts (a floor: real routing is skewed and the cache keeps the hot experts). Prefetch copies the
predicted (top_k + margin) experts over PCIe while the previous layer runs, but no more than the CPU cannot serve
meanwhile (the scheduler's ring quota); the part that lands in time turns misses into hits. A CPU-served expert
enters the cache only after repeated use, so uniform routing costs no admission copies. mmap'd experts that do
not fit in the page cache are read from disk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..offload.plan import Footprint, GiB, Hardware, Plan, PlanOptions, footprint_from_config, make_plan
from ..offload.scheduler import CostModel
from .profile import EngineCosts

DTYPE_BYTES = {"float32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "f16": 2}
# Bits per weight (GPU-resident layers, routed experts) of GGUF files as hybrid runners use them: non-expert
# layers at Q8_0, experts at the named type (nominal block sizes; _M mixes add a few % of Q6_K rows).
QUANT_BITS = {"q8_0": (8.5, 8.5), "q6_k": (8.5, 6.5625), "q5_k_m": (8.5, 5.5), "q4_k_m": (8.5, 4.5),
              "q4_0": (8.5, 4.5), "q3_k_m": (8.5, 3.4375), "q2_k": (8.5, 2.625)}
CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072, 163840)
STEP_OVERHEAD_S = 0.5e-3  # sampling and the Python loop, per decode step


@dataclass(slots=True)
class TuneOptions:
    context: int | None = None  # None: the tuner chooses
    batch: int | None = None  # None: 1, as generation runs one sequence (batches arrive with the server)
    min_context: int = 4096
    max_context: int = 163840  # also capped by the model's max_position_embeddings
    # Sizes searched when batch is None. Only 1 while generation runs one sequence: a plan for a larger batch
    # would only budget KV cache for rows that never run, shrinking the expert cache.
    batches: tuple[int, ...] = (1,)
    margins: tuple[int, ...] = (0, 1, 2, 4, 8)
    speed_tolerance: float = 0.05  # speed given up, at most, for a longer context
    batch_floor: float = 0.8  # a larger batch may slow each sequence to this fraction of batch 1
    prefetch_recall: float = 0.6  # of the top_k, predicting from the previous layer with no margin
    # Fixed cost per layer (attention, norms, router, shared expert: ~40 eager kernels), in units of the cost
    # model's launch_s, which is one expert FFN's launches (~5 kernels).
    launches_per_layer: float = 8.0
    host_sync_s: float = 50e-6  # per MoE layer: the one sync that brings the expert ids to the host
    pageable_factor: float = 0.5  # copies from the mmap tier are pageable: about half the pinned rate
    page_cache_fraction: float = 0.9  # of available RAM that the page cache can give to mmap'd experts
    cpu_curve: dict[int, float] = field(default_factory=dict)  # measured CPU expert read rate by thread count
    engine: EngineCosts | None = None  # the engine's measured fixed costs; None: launch counts and defaults
    plan: PlanOptions = field(default_factory=PlanOptions)  # margins and reserves for make_plan

    def __post_init__(self):
        if self.context is not None and self.context < 1 or self.batch is not None and self.batch < 1:
            raise ValueError("--ctx and --batch must be >= 1")
        if not 0 < self.prefetch_recall <= 1 or not 0 < self.batch_floor <= 1:
            raise ValueError("prefetch_recall and batch_floor must be in (0, 1]")


@dataclass(slots=True)
class Prediction:
    tok_s: float  # per sequence
    batch: int
    gpu_s: float  # per step: non-expert layers and GPU-served experts
    cpu_s: float  # CPU-served experts (disk reads included)
    disk_s: float
    copy_s: float  # PCIe busy with prefetch copies (overlapped with compute)
    hit_rate: float  # from the cache alone
    gpu_served: float  # fraction of expert work on GPUs, prefetch included

    @property
    def aggregate_tok_s(self) -> float:
        return self.tok_s * self.batch


@dataclass(slots=True)
class Choice:
    plan: Plan
    tier: str
    margin: int
    threads: int
    prediction: Prediction


@dataclass(slots=True)
class TuneResult:
    choice: Choice
    rows: list[tuple[str, str, str]]  # (setting, value, why)
    notes: list[str]


def footprint_for(model: str | Path, dtype: str = "bfloat16", quant: str | None = None,
                  layers_as_stored: bool = False) -> tuple[Footprint, dict]:
    """A model's sizes as it will run. GGUF: experts at the file's bytes, other layers widened to `dtype` as the
    loader does for a GPU, or as the file stores them (layers_as_stored: the CPU runs them quantized); HF: `dtype`
    for all (FP8 experts are widened on load), or `quant`'s bits per weight."""
    from ..models.loader import read_config
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    path = Path(model)
    if path.suffix == ".gguf":
        from ..formats.gguf import GGUFFile, hf_config
        f = GGUFFile(path)
        cfg = hf_config(f)
        exps = [t for name, t in f.tensors.items() if "_exps" in name]
        params = sum(math.prod(t.shape) for t in exps)
        expert_bytes = sum(t.nbytes for t in exps) / params if params else DTYPE_BYTES[dtype]
        weight_bytes = DTYPE_BYTES[dtype]
        if layers_as_stored:
            rest = [t for name, t in f.tensors.items() if "_exps" not in name and len(t.shape) > 1]
            weight_bytes = sum(t.nbytes for t in rest) / max(1, sum(math.prod(t.shape) for t in rest))
        return footprint_from_config(cfg, weight_bytes, expert_bytes, kv_bytes=DTYPE_BYTES[dtype]), cfg
    cfg = read_config(path)
    if quant is not None:
        if quant.lower() not in QUANT_BITS:
            raise ConfigError(f"--quant {quant!r}: use one of {', '.join(QUANT_BITS)}")
        w, e = QUANT_BITS[quant.lower()]
        return footprint_from_config(cfg, w / 8, e / 8), cfg
    b = DTYPE_BYTES[dtype]
    return footprint_from_config(cfg, b, b), cfg


def pick_threads(cores: int, cost: CostModel, curve: dict[int, float], gpus: bool = True) -> tuple[int, float, str]:
    """(threads, CPU read rate at that count, why)."""
    if curve:
        best = max(curve.values())
        n = min(t for t, bw in curve.items() if bw >= 0.95 * best)
        return n, curve[n], f"fewest threads within 5% of the best measured CPU read rate ({best / 1e9:.0f} GB/s)"
    if cores > 4 and gpus:
        return cores - 1, cost.cpu_bytes_per_s, "all cores but one, which feeds the GPUs (not measured)"
    return cores, cost.cpu_bytes_per_s, "all cores (not measured)"


def predict(fp: Footprint, hw: Hardware, cost: CostModel, plan: Plan, tier: str, margin: int, cpu_bw: float,
            flops_per_token: float, opts: TuneOptions, batch: int = 1, fill: int | None = None) -> Prediction:
    """Predicted decode speed of `plan` with `batch` sequences; cpu_bw: the CPU's expert read rate; fill: tokens
    in the KV cache (default: half the context, a conversation that fills it).

    With the engine's measured costs (opts.engine), each step pays its measured fixed costs (per step, per MoE
    layer, per CPU-served expert) on top of reading bytes at the rates of the kernels the engine runs; with the
    CPU standing in for the GPU (engine accelerator "cpu"), slot-served and CPU-served experts share the cores,
    so their times add up instead of overlapping."""
    eng = opts.engine if opts.engine is not None and opts.engine.measured else None
    sim = eng is not None and eng.accelerator == "cpu"
    gpus = bool(plan.devices)
    gpu_bw = cost.gpu_bytes_per_s if gpus and not sim else cpu_bw  # without GPUs the CPU runs every layer
    if eng is not None and (sim or not gpus) and eng.cpu_layer_bytes_per_s:
        gpu_bw = eng.cpu_layer_bytes_per_s  # the CPU runs the layers kept quantized
    launch = cost.launch_s if gpus and eng is None else 0.0
    fill = plan.context // 2 if fill is None else fill
    stage = {layer: s for s, d in enumerate(plan.devices) for layer in d.layers}
    frac = [d.expert_slots / max(1, sum(fp.experts_per_layer[i] for i in d.layers)) for d in plan.devices]
    budget = hw.ram_available * opts.page_cache_fraction
    resident = 1.0 if tier == "pinned" else min(1.0, budget / max(1, fp.expert_host_total))
    h2d = cost.h2d_bytes_per_s * (1.0 if tier == "pinned" else opts.pageable_factor)
    # The engine copies mmap'd experts from pageable memory: the host waits for each copy.
    blocking_copies = eng is not None and (tier == "mmap" or sim)
    k = fp.top_k
    total = gpu_t = cpu_t = disk_t = copy_t = served = work = hits = 0.0
    window = 0.0
    dense_seen = 0
    for layer, wbytes in enumerate(fp.layer_bytes):
        nonexp = (wbytes + fp.kv_bytes_per_token[layer] * fill * batch) / gpu_bw + opts.launches_per_layer * launch
        n_exp = fp.experts_per_layer[layer]
        if not n_exp or not k:
            dense_seen += 1
            if eng is not None and dense_seen > 1:  # the twins had one dense layer; charge others as MoE layers
                nonexp += eng.moe_layer_s
            total += nonexp
            gpu_t += nonexp
            window = nonexp
            continue
        used = n_exp * (1 - (1 - k / n_exp) ** batch)  # distinct experts this step
        per = batch * k / used  # tokens per expert
        f = frac[stage[layer]] if gpus else 0.0
        miss = used * (1 - f)
        converted = t_copy = 0.0
        if margin and 0 < f < 1:
            recall = 1 - (1 - opts.prefetch_recall) * k / (k + margin)
            # the engine copies no more predicted misses than the CPU cannot serve meanwhile (its ring quota)
            quota = cost.ring_quota(round(miss), fp.expert_slot_bytes, flops_per_token) if batch == 1 else miss
            n_copy = min(used * (k + margin) / k * (1 - f), quota)
            t_copy = n_copy * fp.expert_slot_bytes * (1 / h2d + (1 - resident) / hw.disk_read_bytes_per_s)
            if blocking_copies:
                converted = min(miss, n_copy) * recall
            else:  # copies land while the previous layer runs
                converted = min(miss, n_copy) * recall * min(1.0, window / max(t_copy, 1e-12))
                t_copy = min(t_copy, window)
        on_cpu = miss - converted
        t_cpu = on_cpu * max(fp.expert_host_bytes / cpu_bw, per * flops_per_token / cost.cpu_flops)
        t_disk = on_cpu * fp.expert_host_bytes * (1 - resident) / hw.disk_read_bytes_per_s
        if not gpus:
            t_gpu = 0.0
        elif sim:  # slots computed by the same CPU kernels, over the slot's copy in the file's layout
            t_gpu = (used - on_cpu) * fp.expert_slot_bytes / cpu_bw
        else:
            fixed = cost.launch_s if eng is not None else 0.0  # in the measured per-layer cost
            t_gpu = (used - on_cpu) * (cost.gpu_s(max(1, round(per)), fp.expert_slot_bytes, flops_per_token) - fixed)
        if eng is None:
            t_layer = nonexp + max(t_gpu, t_cpu + t_disk) + (opts.host_sync_s if gpus else 0.0)
        else:
            t_cpu += on_cpu * eng.cpu_expert_s
            experts = t_gpu + t_cpu + t_disk if sim or not gpus else max(t_gpu, t_cpu + t_disk)
            t_layer = nonexp + eng.moe_layer_s + experts + (t_copy if blocking_copies else 0.0)
        total += t_layer
        gpu_t, cpu_t, disk_t, copy_t = gpu_t + nonexp + t_gpu, cpu_t + t_cpu + t_disk, disk_t + t_disk, copy_t + t_copy
        served, work, hits = served + used - on_cpu, work + used, hits + used * f
        window = t_layer
    head = (fp.head_bytes or fp.embed_bytes) / gpu_bw
    step = total + head + (eng.step_s if eng is not None else STEP_OVERHEAD_S)
    return Prediction(1.0 / step, batch, gpu_t + head, cpu_t, disk_t, copy_t, hits / max(1e-9, work),
                      served / max(1e-9, work))


def expert_flops(cfg: dict) -> float:
    """FLOPs of one routed expert for one token (gate, up and down matrices)."""
    from ..models.loader import model_args
    _, args = model_args(cfg)
    inter, dim = args.expert_shape
    return 6.0 * inter * dim


def _contexts(opts: TuneOptions, model_max: int) -> list[int]:
    if opts.context is not None:
        return [opts.context]
    top = min(opts.max_context, model_max)
    return sorted({c for c in CONTEXTS if opts.min_context <= c <= top} | {min(opts.min_context, top)})


def _plan(fp: Footprint, hw: Hardware, opts: TuneOptions, context: int, batch: int, tier: str,
          max_slots: int | None = None) -> Plan:
    o = opts.plan
    slots = o.max_slots if max_slots is None else max_slots if o.max_slots is None else min(max_slots, o.max_slots)
    return make_plan(fp, hw, PlanOptions(context, batch, o.vram_reserve, o.vram_margin, o.ram_fraction, tier,
                                         slots, o.prefetch_margin))


def _best(fp, hw, cost, opts, flops, context, batch, tiers, threads, cpu_bw) -> Choice | None:
    """The fastest tier and prefetch margin for one context and batch, or None if nothing fits."""
    best = None
    # The cache off too: where the engine's measured costs make copies dearer than the CPU's reads (the CPU
    # standing in for the GPU), as many slots as fit are not the fastest.
    caps = (None, 0) if opts.engine is not None and opts.engine.measured and hw.gpus else (None,)
    for tier in tiers:
        for cap in caps:
            plan = _plan(fp, hw, opts, context, batch, tier, cap)
            if not plan.fits:
                continue
            partial = 0 < plan.experts["cache_slots_total"] < sum(fp.experts_per_layer)
            for margin in (opts.margins if partial else (0,)):
                pred = predict(fp, hw, cost, plan, tier, margin, cpu_bw, flops, opts, batch)
                if best is None or pred.tok_s > best.prediction.tok_s * 1.001:  # ties: the smaller margin, more slots
                    best = Choice(plan, tier, margin, threads, pred)
    return best


def tune(fp: Footprint, hw: Hardware, cost: CostModel, flops_per_token: float, model_max_context: int,
         opts: TuneOptions | None = None) -> TuneResult:
    """Search contexts, batches, host tiers and prefetch margins; explain the winner."""
    opts = opts or TuneOptions()
    threads, cpu_bw, why_threads = pick_threads(hw.cpu_cores, cost, opts.cpu_curve, bool(hw.gpus))
    eng = opts.engine
    if eng is not None and eng.measured:  # its rates and fixed costs hold at the thread count they were timed at
        threads = eng.threads or hw.cpu_cores
        cpu_bw = eng.cpu_expert_bytes_per_s or cost.cpu_bytes_per_s
        why_threads = "the CPU kernels' thread count when the engine's costs were measured"
    # Pinning only speeds up copies to a GPU; without one the experts stay mmap'd.
    pinned_fits = bool(hw.gpus) and fp.expert_host_total <= hw.ram_available * opts.plan.ram_fraction
    # Pinned only where it is faster: it costs RAM and load time.
    tiers = ("mmap", "pinned") if pinned_fits else ("mmap",)
    args = (fp, hw, cost, opts, flops_per_token)
    b1 = opts.batch or 1
    by_ctx = {c: _best(*args, c, b1, tiers, threads, cpu_bw) for c in _contexts(opts, model_max_context)}
    by_ctx = {c: ch for c, ch in by_ctx.items() if ch is not None}
    if not by_ctx:
        smallest = _plan(fp, hw, opts, _contexts(opts, model_max_context)[0], b1, tiers[0])
        raise ConfigError("no plan fits this machine: " + "; ".join(smallest.problems))
    fastest = max(ch.prediction.tok_s for ch in by_ctx.values())
    context = max(c for c, ch in by_ctx.items() if ch.prediction.tok_s >= (1 - opts.speed_tolerance) * fastest)
    choice = by_ctx[context]
    if opts.batch is None:
        for b in opts.batches:
            ch = _best(*args, context, b, tiers, threads, cpu_bw) if b != b1 else choice
            if ch and ch.prediction.tok_s >= opts.batch_floor * by_ctx[context].prediction.tok_s and \
                    ch.prediction.aggregate_tok_s > choice.prediction.aggregate_tok_s * 1.05:
                choice = ch
    no_prefetch = predict(fp, hw, cost, choice.plan, choice.tier, 0, cpu_bw, flops_per_token, opts,
                          choice.prediction.batch)
    rows = explain(fp, hw, choice, opts, why_threads, no_prefetch, by_ctx, fastest)
    return TuneResult(choice, rows, list(choice.plan.notes))


def explain(fp, hw, ch: Choice, opts, why_threads, no_prefetch: Prediction, by_ctx, fastest) -> list[tuple]:
    plan, pred = ch.plan, ch.prediction
    rows = []
    if plan.devices:
        split = " | ".join(f"{d.layers[0]}-{d.layers[-1]}" if d.layers else "-" for d in plan.devices)
        sizes = " | ".join(f"{(d.bytes_weights + d.bytes_kv) / GiB:.1f}" for d in plan.devices)
        rows.append(("layers per GPU", split, f"contiguous stages balanced by bytes (weights + KV: {sizes} GiB)"))
        slots = " | ".join(str(d.expert_slots) for d in plan.devices)
        frac = plan.experts["cache_slots_total"] / max(1, sum(fp.experts_per_layer))
        if plan.experts["cache_slots_total"] or not fp.experts_per_layer:
            why = (f"the VRAM left after weights, KV and the reserve: {100 * frac:.0f}% of experts, so a "
                   f"{100 * pred.hit_rate:.0f}% hit rate with uniform routing (skew helps)")
        else:
            why = "the cache off: with the engine's measured costs, copies into slots cost more than they save"
        rows.append(("expert cache slots", slots, why))
    else:
        rows.append(("layers", "CPU", "no GPU: every layer runs on the CPU"))
    host = fp.expert_host_total / GiB
    if ch.tier == "pinned":
        why = (f"{host:.0f} GiB of experts fit in {100 * opts.plan.ram_fraction:.0f}% of {hw.ram_available / GiB:.0f}"
               " GiB available RAM; pinned pages copy at the full PCIe rate")
    else:
        share = min(1.0, hw.ram_available * opts.page_cache_fraction / max(1, fp.expert_host_total))
        pinned_fits = fp.expert_host_total <= hw.ram_available * opts.plan.ram_fraction
        start = ("no GPU to copy to" if not plan.devices else
                 "pinning would not be faster (and costs RAM and load time)" if pinned_fits else
                 f"{host:.0f} GiB of experts do not fit pinned")
        why = (f"{start}; the page cache keeps {100 * share:.0f}%"
               + ("" if share >= 1 else f", the rest streams from disk at {hw.disk_read_bytes_per_s / 1e9:.1f} GB/s"))
    rows.append(("experts tier", ch.tier, why))
    rows.append(("CPU threads", str(ch.threads), why_threads))
    if plan.devices and 0 < plan.experts["cache_slots_total"] < sum(fp.experts_per_layer):
        rows.append(("prefetch margin", str(ch.margin), f"{pred.tok_s:.2f} tok/s vs {no_prefetch.tok_s:.2f} without "
                     f"prefetch; copies keep PCIe busy {1e3 * pred.copy_s:.1f} ms per step"))
    else:
        rows.append(("prefetch margin", str(ch.margin), "the cache holds every expert or there is none: "
                     "nothing to prefetch"))
    c = plan.context
    why = "fixed by --ctx" if opts.context else (
        f"largest context within {100 * opts.speed_tolerance:.0f}% of the fastest ({fastest:.2f} tok/s); tried "
        + ", ".join(str(x) for x in sorted(by_ctx)))
    rows.append(("context", str(c), why))
    b = pred.batch
    why = "fixed by the caller" if opts.batch else (
        "generation runs one sequence at a time" if opts.batches == (1,) else
        "a larger batch would slow each sequence too much or gain little" if b == 1 else
        f"{pred.aggregate_tok_s:.2f} tok/s in all, each sequence at {pred.tok_s:.2f}")
    rows.append(("batch", str(b), why))
    disk = f" (disk {1e3 * pred.disk_s:.1f} ms)" if pred.disk_s > 1e-5 else ""
    where = "GPU" if plan.devices else "non-expert layers"
    on_gpu = f", {100 * pred.gpu_served:.0f}% of expert work on GPUs" if plan.devices else ""
    rows.append(("predicted decode", f"{pred.tok_s:.2f} tok/s", f"per step: {where} {1e3 * pred.gpu_s:.1f} ms, CPU "
                 f"experts {1e3 * pred.cpu_s:.1f} ms{disk}{on_gpu}"))
    return rows


def format_rows(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in [("setting", "value", "why"), *rows])
