"""`hybridmoe plan MODEL --cluster ...`: per engine, every candidate layout with its memory per GPU, why it does not
fit or is not supported, its decode-throughput range, the chosen layout and its launch commands; and, when nothing
fits, the smallest cluster of the same GPUs that would."""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field

from .cluster import (ENGINES, GiB, ClusterSpec, GPUMemory, Layout, ModelShape, candidate_layouts, engine_data,
                      gpu_memory, max_sequences, unsupported)
from .cluster_launch import HEAD, node_commands
from .cluster_speed import Rate, assumptions_text, decode_rate

SCHEMA = 1


@dataclass(slots=True)
class Candidate:
    layout: Layout
    unsupported: list[str]
    memory: GPUMemory
    rate: Rate | None

    @property
    def usable(self) -> bool:
        return not self.unsupported and self.memory.fits

    def score(self) -> float:
        """Higher is better: the geometric middle of the throughput range, else the KV room."""
        if self.rate is not None:
            return math.sqrt(self.rate.low * self.rate.high)
        return float(self.memory.budget - self.memory.total)

    def to_json(self) -> dict:
        lay, m = self.layout, self.memory
        gib = lambda n: round(n / GiB, 2)  # noqa: E731
        return {"name": lay.name, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "attn_dp": lay.attn_dp, "ep": lay.ep,
                "gpus": lay.gpus, "supported": not self.unsupported, "unsupported": self.unsupported,
                "fits": self.usable,
                "memory_gib": {"weights": gib(m.weights), "experts": gib(m.experts), "kv_cache": gib(m.kv),
                               "reserve": gib(m.reserve), "total": gib(m.total), "budget": gib(m.budget),
                               "short": gib(m.short)},
                "sequences_per_attention_group": m.sequences_per_group,
                "max_sequences": max_sequences(m, lay),
                "throughput_tok_s": self.rate.to_json() if self.rate else None}


@dataclass(slots=True)
class EnginePlan:
    engine: str
    candidates: list[Candidate]
    chosen: Candidate | None
    commands: list[list[str]]
    smallest: str | None  # the smallest cluster of these GPUs that serves the model, when this one does not

    def to_json(self) -> dict:
        e = engine_data()["engines"][self.engine]
        return {"engine": e["name"], "version": e["version"], "flags_from": e["source"],
                "fits": self.chosen is not None,
                "layout": self.chosen.layout.name if self.chosen else None,
                "candidates": [c.to_json() for c in self.candidates],
                "commands": [{"node": i, "argv": argv, "command": shlex.join(argv)}
                             for i, argv in enumerate(self.commands)],
                "smallest_cluster": self.smallest}


@dataclass(slots=True)
class ClusterPlan:
    model: str
    shape: ModelShape
    cluster: ClusterSpec
    context: int
    concurrency: int
    engines: dict[str, EnginePlan]
    notes: list[str] = field(default_factory=list)
    local: dict | None = None  # filled by the command: does this machine run it with hybridmoe?

    @property
    def fits(self) -> bool:
        return any(p.chosen is not None for p in self.engines.values())

    def to_json(self) -> dict:
        s, c = self.shape, self.cluster
        return {
            "schema": SCHEMA,
            "model": {"path": self.model, "model_type": s.model_type, "dtype": s.dtype, "layers": s.layers,
                      "routed_experts": s.experts, "experts_per_token": s.top_k,
                      "kv_cache": "MLA latent" if s.mla_latent else "GQA",
                      "weights_gib": round(sum(s.bytes.values()) / GiB, 2)},
            "cluster": {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "gpu": c.gpu.name,
                        "gpu_memory_gib": c.gpu.memory_gib},
            "context": self.context, "concurrency": self.concurrency, "fits": self.fits,
            "engines": {k: p.to_json() for k, p in self.engines.items()},
            "local": self.local,
            "assumptions": assumptions_text(self.concurrency, self.context),
            "notes": self.notes,
        }


def evaluate(shape: ModelShape, cluster: ClusterSpec, engine: str, context: int, concurrency: int) -> list[Candidate]:
    out = []
    for lay in candidate_layouts(engine, cluster.nodes, cluster.gpus_per_node):
        mem = gpu_memory(shape, lay, cluster.gpu, context, concurrency)
        why = unsupported(shape, lay)
        rate = None if why or not mem.fits else decode_rate(shape, lay, cluster, mem, context, concurrency)
        out.append(Candidate(lay, why, mem, rate))
    return out


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The best usable layout; within 2% of the best, the first listed (the engines' more usual layout)."""
    usable = [c for c in candidates if c.usable]
    if not usable:
        return None
    best = max(c.score() for c in usable)
    return next(c for c in usable if c.score() >= 0.98 * best)


def smallest_cluster(shape: ModelShape, like: ClusterSpec, engine: str, context: int,
                     concurrency: int) -> ClusterSpec | None:
    """The fewest GPUs of the same kind (one node of 1, 2, 4, ... GPUs, then whole nodes) on which a layout fits."""
    g = like.gpus_per_node
    sizes = [(1, n) for n in (1, 2, 4, 8, 16) if n < g] + [(nodes, g) for nodes in range(1, 129)]
    for nodes, per_node in sizes:
        c = ClusterSpec(nodes, per_node, like.gpu)
        if choose(evaluate(shape, c, engine, context, concurrency)):
            return c
    return None


def plan_cluster(shape: ModelShape, cluster: ClusterSpec, model: str, context: int,
                 concurrency: int) -> ClusterPlan:
    if context < 1 or concurrency < 1:
        raise ValueError("--ctx and --concurrency must be >= 1")
    engines = {}
    for engine in ENGINES:
        cands = evaluate(shape, cluster, engine, context, concurrency)
        chosen = choose(cands)
        cmds = node_commands(chosen.layout, model, cluster.nodes, cluster.gpus_per_node, context,
                             concurrency) if chosen else []
        small = None
        if chosen is None:
            found = smallest_cluster(shape, cluster, engine, context, concurrency)
            small = found.label if found else None
        engines[engine] = EnginePlan(engine, cands, chosen, cmds, small)
    notes = []
    if cluster.nodes > 1:
        notes.append(f"replace {HEAD} with the address of node 0; the model must be at the same path on every node")
    if shape.fp8_block and not cluster.gpu.tflops_fp8 and cluster.gpu.hbm_tb_s:
        notes.append(f"{cluster.gpu.name} has no FP8 tensor cores: both engines run the FP8 weights through "
                     "weight-only FP8 kernels (same memory, slower compute)")
    if not cluster.gpu.hbm_tb_s:
        notes.append("no throughput estimate for a GPU given by its memory size: name the GPU "
                     f"({', '.join(engine_data()['gpus'])})")
    return ClusterPlan(model, shape, cluster, context, concurrency, engines, notes)
