"""What `hybridmoe plan MODEL --cluster NODESxGPUS[:GPU]` prints: the cluster plan of offload/cluster_plan.py, and
whether this machine runs the model with hybridmoe itself."""
from __future__ import annotations

import json
from pathlib import Path

from .offload.cluster import GiB, ClusterSpec, model_shape, parse_cluster
from .offload.cluster_plan import ClusterPlan, plan_cluster, smallest_cluster

GGUF_CHECKPOINT = "HF_CHECKPOINT"  # the engines load the HF release, not the GGUF
Q4_K_BYTES = 4.5 / 8  # bytes per weight of Q4_K blocks


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def local_verdict(model: str, cfg: dict | None, hardware, ctx: int, batch: int, experts_tier: str,
                  max_slots: int | None) -> dict:
    """Does this machine (or the one --gpus/--ram/--profile describe) run the model with hybridmoe? The same
    placement `plan` prints without --cluster."""
    from .offload.plan import PlanOptions, footprint_from_config, footprint_from_gguf, make_plan
    fp = footprint_from_gguf(model) if cfg is None else footprint_from_config(cfg, weight_bytes=2, expert_bytes=2)
    p = make_plan(fp, hardware, PlanOptions(context=ctx, batch=batch, experts_tier=experts_tier,
                                            max_slots=max_slots))
    experts = p.experts["bytes"]
    device = " --device cuda" if hardware.gpus else ""
    if p.fits and experts <= hardware.ram_available:
        verdict, text = "fits", (f"this machine runs it with hybridmoe (experts {_gib(experts)} GiB in RAM, the "
                                 f"rest on {len(hardware.gpus) or 'no'} GPU(s)): hybridmoe chat {model}{device}")
    elif p.fits:
        verdict, text = "disk", (f"this machine runs it with hybridmoe only by streaming {_gib(experts)} GiB of "
                                 f"experts from disk ({_gib(hardware.ram_available)} GiB RAM available): slow; "
                                 f"hybridmoe chat {model}{device}")
    else:
        verdict, text = "no", f"this machine cannot run it, even with offload: {p.problems[0]}"
    if verdict != "fits" and cfg is not None:  # hybridmoe widens HF experts to bf16; a 4-bit GGUF is what fits RAM
        q4 = make_plan(footprint_from_config(cfg, weight_bytes=2, expert_bytes=Q4_K_BYTES), hardware,
                       PlanOptions(context=ctx, batch=batch, experts_tier=experts_tier, max_slots=max_slots))
        if q4.fits and q4.experts["bytes"] <= hardware.ram_available:
            text += (f"; as a 4-bit GGUF (experts {_gib(q4.experts['bytes'])} GiB) it fits in RAM here: "
                     f"hybridmoe convert {model} model.gguf --type q4_k_m")
    return {"verdict": verdict, "text": text, "problems": p.problems}


def run(args, hardware) -> int:
    """The command: args from `plan` (model, cluster, ctx, batch, concurrency, json, and the local machine's
    description options), hardware: the local machine as `plan` sees it."""
    from .models.loader import read_config
    cluster = parse_cluster(args.cluster)
    if str(args.model).endswith(".gguf"):
        from .formats.gguf import GGUFFile, hf_config
        cfg, shape, served = None, model_shape(hf_config(GGUFFile(args.model)), as_released=True), GGUF_CHECKPOINT
    else:
        cfg = read_config(args.model)
        shape = model_shape(cfg)
        path = Path(args.model)
        served = str((path.parent if path.name == "config.json" else path).resolve())  # the same on every node
    plan = plan_cluster(shape, cluster, served, args.ctx, args.concurrency)
    if cfg is None:
        plan.notes.append(f"the engines load the HF checkpoint of this model, not the GGUF: replace {GGUF_CHECKPOINT} "
                          "with its directory; sized as that release stores it (DeepSeek-V3/R1: FP8, others: BF16)")
    plan.local = local_verdict(args.model, cfg, hardware, args.ctx, args.batch, args.experts_tier,
                               args.expert_cache_slots)
    if plan.local["verdict"] != "fits":
        sizes = {}
        for engine, p in plan.engines.items():
            found = smallest_cluster(shape, ClusterSpec(1, cluster.gpus_per_node, cluster.gpu), engine, args.ctx,
                                     args.concurrency)
            sizes[engine] = found.label if found else None
        plan.local["clusters_that_serve_it"] = sizes
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print_plan(plan)
    return 0 if plan.fits else 3


def print_plan(plan: ClusterPlan) -> None:
    j = plan.to_json()
    m = j["model"]
    print(f"{m['model_type']}: {m['weights_gib']:.1f} GiB of weights ({m['dtype']}), {m['layers']} layers, "
          f"{m['routed_experts']} routed experts ({m['experts_per_token']} per token), KV cache: {m['kv_cache']}")
    print(f"cluster {plan.cluster.label} ({plan.cluster.gpu.memory_gib:g} GiB each); context {plan.context}, "
          f"{plan.concurrency} sequences at once")
    for e in j["engines"].values():
        print(f"\n{e['engine']} {e['version']} (flags from {e['flags_from']})")
        print(f"  {'layout':<17}{'GPUs':>5}{'weights':>9}{'experts':>9}{'KV':>7}{'reserve':>9}{'total':>8}"
              f"{'budget':>8}  GiB per GPU")
        for c in e["candidates"]:
            g = c["memory_gib"]
            mark = "*" if c["name"] == e["layout"] else " "
            print(f"{mark} {c['name']:<17}{c['gpus']:>5}{g['weights']:>9.1f}{g['experts']:>9.1f}{g['kv_cache']:>7.1f}"
                  f"{g['reserve']:>9.1f}{g['total']:>8.1f}{g['budget']:>8.1f}  {_status(c)}")
        if e["commands"]:
            print(f"  launch ({e['layout']}), node 0 first:")
            for cmd in e["commands"]:
                print(f"    node {cmd['node']}: {cmd['command']}")
        else:
            small = e["smallest_cluster"]
            print(f"  no layout fits {plan.cluster.label}; " + (f"the smallest cluster of these GPUs that does: "
                                                              f"{small}" if small else "none up to 128 nodes does"))
    local = plan.local or {}
    if local:
        print(f"\n{local['text']}")
        sizes = local.get("clusters_that_serve_it")
        if sizes:
            print("clusters that serve it: " + "; ".join(f"{j['engines'][k]['engine']} {v or 'none up to 128 nodes'}"
                                                        for k, v in sizes.items()))
    print("\nthroughput assumptions: " + "; ".join(j["assumptions"]))
    for note in j["notes"]:
        print(f"note: {note}")
    print("fits" if plan.fits else "DOES NOT FIT")


def _status(c: dict) -> str:
    if not c["supported"]:
        return "not supported: " + "; ".join(c["unsupported"])
    if not c["fits"]:
        g = c["memory_gib"]
        return (f"does not fit: {g['short']:.1f} GiB short per GPU (weights {g['weights'] + g['experts']:.1f} + KV "
                f"{g['kv_cache']:.1f} + reserve {g['reserve']:.1f} > {g['budget']:.1f})")
    r = c["throughput_tok_s"]
    speed = (f"decode {r['low']:,.0f}-{r['high']:,.0f} tok/s ({r['per_sequence_low']:.0f}-"
             f"{r['per_sequence_high']:.0f} per sequence, {r['bound']}-bound)") if r else "decode: no estimate"
    return f"fits, room for {c['max_sequences']} sequences; {speed}"
