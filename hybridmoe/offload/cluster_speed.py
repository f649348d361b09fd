"""An aggregate decode-throughput range for a cluster layout: a bandwidth model of one decode step, bounded by the
assumptions in cluster_engines.toml. A step on each GPU reads its resident non-expert weights, the routed experts the
step's tokens touch and its sequences' KV cache, and computes 2 FLOPs per active parameter and token; each layer adds
a fixed kernel time; the tensor-parallel all-reduces, expert all-to-alls and pipeline hand-offs add their transfer
and latency. An estimate to choose between layouts and to size a deployment, not a measurement."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cluster import ClusterSpec, GPUMemory, Layout, ModelShape, engine_data, stage_layers

ACT_BYTES = 2  # activations cross GPUs in bf16
DISPATCH_BYTES = 1 + 2  # expert all-to-all: tokens out in fp8, results back in bf16


@dataclass(frozen=True, slots=True)
class Rate:
    low: float  # aggregate tokens/s over all sequences, pessimistic end
    high: float
    per_sequence_low: float  # tokens/s one sequence sees
    per_sequence_high: float
    bound: str  # what dominates a step at the low end: memory, compute or communication

    def to_json(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _step(shape: ModelShape, lay: Layout, cluster: ClusterSpec, mem: GPUMemory, context: int, concurrency: int,
          end: int) -> tuple[float, str]:
    """Seconds for one pipeline stage to advance its micro-batch by one token, and the dominating term. end: 0 for
    the pessimistic bound, 1 for the optimistic one."""
    a, gpu = engine_data()["assumptions"], cluster.gpu
    ls = stage_layers(shape, lay.pp)
    moe_ls = min(ls, shape.moe_layers)
    micro = -(-concurrency // lay.pp)  # sequences per pipeline micro-batch
    per_group = -(-micro // lay.attn_groups)
    stage_gpus = lay.gpus // lay.pp
    # distinct experts the micro-batch's tokens touch, uniform routing: 1 - (1 - k/E)^T of them
    touched = 1 - (1 - shape.top_k / shape.experts) ** micro if shape.experts else 0.0
    kv_read = per_group * mem.kv_per_sequence * a["average_context"]
    t_mem = (mem.weights + mem.experts * touched + kv_read) / (gpu.hbm_tb_s * 1e12 * a["bandwidth_efficiency"][end])
    tflops = gpu.tflops_fp8 if shape.fp8_block and gpu.tflops_fp8 else gpu.tflops_bf16
    t_comp = 2 * shape.params_active * micro / stage_gpus / (tflops * 1e12 * a["compute_efficiency"][end])

    def collective(inside: bool, nbytes: float, times: int = 1) -> float:
        """`times` collectives moving nbytes per GPU each, over NVLink inside a node or the network across nodes."""
        link = (gpu.link_gb_s if inside else gpu.nic_gb_s) * 1e9 * a["link_efficiency"][end]
        latency = (a["latency_us_node"] if inside else a["latency_us_cluster"])[end] * 1e-6
        return times * (latency + nbytes / link)

    g = cluster.gpus_per_node
    act = shape.dim * ACT_BYTES
    t_comm = 0.0
    if lay.attn_tp > 1:  # ring all-reduces after attention and after the MLP of every layer
        ring = 2 * (lay.attn_tp - 1) / lay.attn_tp * per_group * act
        t_comm += collective(lay.attn_tp <= g, ring, 2 * ls)
    if lay.moe_group > lay.attn_tp:  # experts spread wider than one attention group
        if lay.ep:  # dispatch and combine; across nodes only the share bound for other nodes uses the network
            moved = micro / stage_gpus * shape.top_k * shape.dim * DISPATCH_BYTES
            remote = 1 - g / lay.moe_group if lay.moe_group > g else 1 - 1 / lay.moe_group
            t_comm += collective(lay.moe_group <= g, moved * remote / 2, 2 * moe_ls)
        else:  # vLLM's data-parallel engines all-reduce the expert outputs over the whole group
            ring = 2 * (lay.moe_group - 1) / lay.moe_group * micro * act
            t_comm += collective(lay.moe_group <= g, ring, moe_ls)
    if lay.pp > 1:  # hand the micro-batch's hidden states to the next node
        t_comm += collective(False, micro * act)
    work = max(t_mem, t_comp) + ls * a["layer_floor_us"][end] * 1e-6
    step = max(work, t_comm) if a["overlap"][end] else work + t_comm
    bound = max((t_mem, "memory"), (t_comp, "compute"), (t_comm, "communication"))[1]
    return step, bound


def decode_rate(shape: ModelShape, lay: Layout, cluster: ClusterSpec, mem: GPUMemory, context: int,
                concurrency: int) -> Rate | None:
    """Aggregate decode tokens/s at the stated concurrency, as a (low, high) range; None without the GPU's
    bandwidth (a GPU given by its memory size only)."""
    if not cluster.gpu.hbm_tb_s:
        return None
    (lo, bound), (hi, _) = (_step(shape, lay, cluster, mem, context, concurrency, end) for end in (0, 1))
    # a token of one sequence passes every stage; S sequences advance once per pp stage-steps
    return Rate(concurrency / (lay.pp * lo), concurrency / (lay.pp * hi), 1 / (lay.pp * lo), 1 / (lay.pp * hi),
                bound)


def assumptions_text(concurrency: int, context: int) -> list[str]:
    a = engine_data()["assumptions"]
    lo, hi = a["bandwidth_efficiency"]
    return [
        f"decode only, {concurrency} sequences at once, each on average {a['average_context']:.0%} into a "
        f"{context}-token context",
        f"memory bandwidth {lo:.0%}-{hi:.0%} of the datasheet, tensor throughput "
        f"{a['compute_efficiency'][0]:.0%}-{a['compute_efficiency'][1]:.0%}, links "
        f"{a['link_efficiency'][0]:.0%}-{a['link_efficiency'][1]:.0%} with "
        f"{a['latency_us_node'][1]:g}-{a['latency_us_node'][0]:g} us per collective inside a node and "
        f"{a['latency_us_cluster'][1]:g}-{a['latency_us_cluster'][0]:g} us across nodes",
        f"{a['layer_floor_us'][1]:g}-{a['layer_floor_us'][0]:g} us per layer of fixed kernel time; routing "
        "spreads tokens uniformly over experts; the high end assumes communication overlaps compute (two-batch "
        "overlap), the low end that it does not",
        "network between nodes as in the vendor's reference systems (one NIC per GPU); no speculative decoding, "
        "no prefill traffic",
    ]
