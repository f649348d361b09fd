"""Facts about the loaded model and where its parts live, as (label, value) rows for the model screen.

Only public engine attributes are read, each with a fallback, so that a field the engine does not have yet shows
as "?" instead of breaking the screen."""
from __future__ import annotations


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def moe_layers(engine) -> list[int]:
    try:
        return list(engine.model.moe_layers())
    except AttributeError:
        return []


def n_experts(engine) -> int:
    return int(getattr(engine.args, "n_routed_experts", 0) or 0)


def param_counts(engine) -> tuple[int, int] | None:
    """(total, active per token). Routed experts are not module parameters, so they are counted from the args."""
    try:
        dense = sum(p.numel() for p in engine.model.parameters())
        inter, dim = engine.args.expert_shape
        top_k = engine.args.router.top_k
    except AttributeError:
        return None
    per_expert = 3 * inter * dim  # gate, up, down
    layers = len(moe_layers(engine))
    return dense + layers * n_experts(engine) * per_expert, dense + layers * top_k * per_expert


def model_facts(engine) -> list[tuple[str, str]]:
    args = engine.args
    router = getattr(args, "router", None)
    counts = param_counts(engine)
    shared = getattr(args, "n_shared_experts", None)
    rows = [
        ("model", str(getattr(engine, "path", "?"))),
        ("type", str(getattr(engine, "model_type", "?"))),
        ("layers", f"{getattr(args, 'n_layers', '?')} ({len(moe_layers(engine))} MoE)"),
        ("routed experts", f"{n_experts(engine)} per layer, {getattr(router, 'top_k', '?')} per token"),
        ("shared experts", str(shared) if shared is not None else ("1" if getattr(args, "shared_inter_dim", 0)
                                                                   else "0")),
        ("hidden size", str(getattr(args, "dim", "?"))),
        ("vocabulary", str(getattr(args, "vocab_size", "?"))),
        ("parameters", f"{human(counts[0])} total, {human(counts[1])} active per token" if counts else "?"),
        ("context", f"{getattr(engine, 'max_context', '?')} tokens"),
        ("device", str(getattr(engine, "device", "?"))),
        ("dtype", str(getattr(engine, "dtype", "?")).replace("torch.", "")),
    ]
    return rows


def placement(engine) -> list[tuple[str, str]]:
    """Where each part of the model lives. An engine may describe its own plan with placement(); otherwise the
    offload runtime's options are read, each with a fallback."""
    describe = getattr(engine, "placement", None)
    if callable(describe):
        try:
            return [(str(k), str(v)) for k, v in describe()]
        except Exception:  # a plan that cannot describe itself should not take the screen down
            pass
    device = str(getattr(engine, "device", "?"))
    experts = getattr(getattr(engine, "model", None), "experts", None)
    rows = [("embeddings, attention, norms", device), ("routers, shared experts", device), ("KV cache", device)]
    opts, slots = getattr(experts, "opts", None), getattr(experts, "slots", None)
    if opts is None or slots is None:
        kind = type(experts).__name__ if experts is not None else "none"
        return rows + [("routed experts", f"{device} ({kind})")]
    accel = getattr(opts, "accelerator", "?")
    return rows + [
        ("routed experts", f"host RAM ({getattr(opts, 'experts_tier', '?')}); run on the CPU or from the cache"),
        ("expert cache", ", ".join(f"{accel} {i}: {n} slots" for i, n in enumerate(slots))),
        ("prefetch", "on" if getattr(experts, "prefetcher", None) is not None else "off"),
    ]
