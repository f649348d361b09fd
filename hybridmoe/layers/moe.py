"""Routing (pure functions, f32) and the Experts interface that MoE blocks hand their work to.

Letters: N tokens, E experts, K experts per token, G groups, D hidden, I expert hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..kernels import cpu as ck
from ..kernels import gpu_kernel_for

CPU_ROUTE_TOKENS = 4  # up to this many tokens, CPU routing is one kernel call (route_hidden)
GPU_LOGITS_TOKENS = 4  # up to this many tokens, the GPU's router logits are one launch (router_logits); more: cuBLAS


@dataclass(frozen=True, slots=True)
class RouterSpec:
    n_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    scaling: float = 1.0
    scale_after_norm: bool = True  # DeepSeek-V3 scales normalised weights; V2 scales only unnormalised ones

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring!r} is not supported (softmax or sigmoid)")
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {self.method!r} is not supported (greedy, group_limited_greedy, noaux_tc)")
        if self.n_experts % self.n_group or self.topk_group > self.n_group or self.top_k > self.n_experts:
            raise ValueError(f"inconsistent routing: {self.n_experts} experts, {self.n_group} groups, "
                             f"topk_group {self.topk_group}, top_k {self.top_k}")


def route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] (f32) -> (expert_ids [N, K] long, weights [N, K] f32)."""
    fused = gpu_kernel_for(logits, "route", "route")
    out = fused(logits, spec, bias) if fused is not None else None  # one launch (eager: 6 to 17 kernels)
    if out is not None:
        return out
    logits = logits.float()
    scores = logits.sigmoid() if spec.scoring == "sigmoid" else logits.softmax(dim=-1)
    plain = spec.method == "greedy" or spec.n_group == 1
    choice = scores if bias is None or spec.method != "noaux_tc" else scores + bias.float()
    if plain and choice is scores:  # the top scores are the weights (no gather)
        weights, ids = scores.topk(spec.top_k, dim=-1)
        return ids, _scaled(weights, spec)
    if not plain:
        N = scores.shape[0]
        grouped = choice.view(N, spec.n_group, -1)  # [N, G, E/G]
        if spec.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
        fill = float("-inf") if spec.method == "noaux_tc" else 0.0
        choice = grouped.masked_fill(~keep[:, :, None], fill).view(N, -1)
    ids = choice.topk(spec.top_k, dim=-1).indices  # [N, K]
    return ids, _scaled(scores.gather(1, ids), spec)


def route_hidden(x: torch.Tensor, router: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] (already normalised), router [E, D] -> `route` of the f32 logits. A decode step's float32 token on
    the CPU takes one kernel call for all of it (kernels.cpu.route_topk): the same choices and weights up to float32
    rounding, without seven to seventeen small ops that each start with cold caches."""
    if (x.device.type == "cpu" and x.dtype == router.dtype == torch.float32 and x.shape[0] <= CPU_ROUTE_TOKENS
            and (bias is None or bias.dtype == torch.float32)):
        return ck.route_topk(x.contiguous(), router, **cpu_routing(spec, bias))
    return route(router_logits(x, router), spec, bias)


def cpu_routing(spec: RouterSpec, bias: torch.Tensor | None) -> dict:
    """`route`'s settings as the CPU's routing kernel takes them (kernels.cpu.route_topk's keywords, MoEBlock's)."""
    renorm = spec.norm_topk_prob and spec.top_k > 1
    grouped, noaux = spec.method != "greedy" and spec.n_group > 1, spec.method == "noaux_tc"
    return dict(top_k=spec.top_k, renorm=renorm, scaling=spec.scaling if not renorm or spec.scale_after_norm else 1.0,
                sigmoid=spec.scoring == "sigmoid", bias=bias if noaux else None,
                n_group=spec.n_group if grouped else 1, topk_group=spec.topk_group if grouped else 1,
                top2_groups=noaux, masked=float("-inf") if noaux else 0.0)


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """x [N, D], router [E, D] -> float32 logits [N, E]; one launch on the GPU for a decode step's few tokens."""
    fused = gpu_kernel_for(x, "route", "router_logits") if x.shape[0] <= GPU_LOGITS_TOKENS else None
    out = fused(x, router) if fused is not None else None
    return out if out is not None else x.float() @ router.float().t()


def _scaled(weights: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The chosen experts' scores [N, K] -> their weights: normalised to sum 1 if asked, times the scaling."""
    if spec.norm_topk_prob and spec.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if not spec.scale_after_norm:
            return weights
    return weights if spec.scaling == 1.0 else weights * spec.scaling


class Experts(Protocol):
    """Where routed experts live and run. The MoE block calls it; the offload engine provides other versions.
    Letters as above; x [N, D], ids [N, K], weights [N, K]."""

    generation: int  # bumped when memory that captured decode graphs read (expert slots) is reallocated

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * expert_{ids[:, k]}(x), as [N, D]."""
        ...

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Begin that work and return a function that waits for its result; the caller computes the shared expert
        in between (CPU-served experts run meanwhile)."""
        ...

    def device_only(self, layer: int) -> bool:
        """Whether one token's experts of this layer can be queued as device-stream work alone (`start_device`:
        no host sync, so a CUDA graph can capture it)."""
        ...

    def start_device(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """`start` for one token of a `device_only` layer, queued without a host sync. Its work is counted in the
        step's stats only when `ran_device(layer)` is called, once per run (a graph replays it without Python)."""
        ...

    def ran_device(self, layer: int) -> None:
        ...

    def take_stats(self) -> dict:
        """Counters since the last call (at least "expert_tokens": layer -> expert -> tokens), for the step's
        stats event."""
        ...

    def release_memory(self) -> str | None:
        """After a GPU out-of-memory error: give memory back (a smaller expert cache) and say what was done, or None
        where there is nothing to give back."""
        ...


class HostPlacedExperts:
    """The Experts defaults for implementations that place every layer's experts on the host after a sync."""

    generation = 0

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        out = self(layer, x, ids, weights)
        return lambda: out

    def device_only(self, layer: int) -> bool:
        return False

    def start_device(self, layer, x, ids, weights):
        raise RuntimeError(f"layer {layer}'s experts are placed on the host")

    def ran_device(self, layer: int) -> None:
        raise RuntimeError(f"layer {layer}'s experts are placed on the host")

    def release_memory(self) -> None:
        return None


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [n, D] -> [n, D]. One row is computed as two: CPU matrix-vector kernels round differently depending on the
    weights' memory alignment (mmap views vs pinned copies vs slots), matrix-matrix kernels do not, and results
    must not depend on where an expert's weights live."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return expert_ffn(x.expand(2, -1), gate, up, down)[:1]
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def combine(parts: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """parts [N, K, D] -> [N, D]: a fixed summation order, so results never depend on where experts ran."""
    fused = gpu_kernel_for(parts, "combine", "combine")
    out = fused(parts, weights, dtype) if fused is not None else None  # one launch (eager: four kernels)
    if out is not None:
        return out
    return (parts.float() * weights[:, :, None]).sum(1).to(dtype)


def run_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                compute: Callable[[int, torch.Tensor], torch.Tensor], counts: dict[int, int],
                compute_many: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
                compute_sum: Callable[[list[int], torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
                compute_grouped: Callable[[list[int], torch.Tensor, list[int]], torch.Tensor | None] | None = None
                ) -> torch.Tensor:
    """Each routed expert once on its tokens, outputs combined in a fixed order; counts tokens per expert.
    compute(e, x_e [n, D]) -> [n, D]; compute_many(experts, x [n, D]) -> [G, n, D], if given, runs a decode step's
    experts together (each with compute's result); compute_sum(experts, x, weights [n, G]) -> [n, D] or None, if
    given, also combines them (the bits `combine` gives); compute_grouped(experts, x_rows, counts) -> [sum(counts),
    D] or None, if given, runs a prefill's experts together, each on its counts[g] rows of x_rows (compute's
    result for each)."""
    N, K = ids.shape
    ids_host = ids.cpu()  # host sync: which experts run is decided on the host
    if N == 1:  # decode: each chosen expert (all distinct) runs on the one token, no index bookkeeping
        chosen = ids_host.tolist()[0]
        for e in chosen:
            counts[e] = counts.get(e, 0) + 1
        y = None if compute_sum is None else compute_sum(chosen, x, weights)
        if y is not None:
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if compute_many is not None:
            return combine(compute_many(chosen, x).transpose(0, 1), weights, x.dtype)  # [K, 1, D] -> [1, K, D]
        parts = x.new_empty(N, K, x.shape[-1])
        for k, e in enumerate(chosen):
            parts[0, k] = compute(e, x)[0]
        return combine(parts, weights, x.dtype)
    parts = x.new_zeros(N, K, x.shape[-1])
    flat = parts.view(N * K, -1)
    pos = expert_positions(ids_host)
    for e, p in pos.items():
        counts[e] = counts.get(e, 0) + len(p)
    if compute_grouped is not None and x.device.type == "cpu":
        order = torch.cat(list(pos.values()))  # flat positions, expert by expert
        y = compute_grouped(list(pos), x[order // K], [len(p) for p in pos.values()])
        if y is not None:
            flat[order] = y
            return combine(parts, weights, x.dtype)
    for (e, p), at in zip(pos.items(), positions_on(list(pos.values()), x.device)):
        flat[at] = compute(e, x[at // K])
    return combine(parts, weights, x.dtype)


def expert_positions(ids_host: torch.Tensor) -> dict[int, torch.Tensor]:
    """ids [N, K] on the host -> {expert: the flat positions n * K + k where it was chosen, ascending}, experts
    ascending. One stable sort for the whole step rather than a search per expert."""
    flat = ids_host.flatten()
    experts, n_tok = flat.unique(return_counts=True)
    return dict(zip(experts.tolist(), flat.argsort(stable=True).split(n_tok.tolist())))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queue (a copy from pageable memory would)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def positions_on(groups: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host index tensors -> the same on `device`, moved together in one copy."""
    return list(to_device(torch.cat(groups), device).split([len(g) for g in groups]))


class LocalExperts(HostPlacedExperts):
    """Experts held as per-expert weight views (zero-copy from the checkpoint) on one device."""

    def __init__(self, weights: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]):
        self.weights = weights  # layer -> [(gate [I, D], up [I, D], down [D, I])] * E
        self.activity: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens routed, since the last take

    def take_stats(self) -> dict:
        """Counters since the last call, for the per-step stats event."""
        out, self.activity = {"expert_tokens": self.activity}, {}
        return out

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.weights[layer]
        return run_experts(x, ids, weights, lambda e, xe: expert_ffn(xe, *experts[e]),
                           self.activity.setdefault(layer, {}))
