"""Placement of a model on a machine, from metadata alone: which GPU owns which layers (contiguous stages balanced by
bytes), the KV-cache budget for the context, expert slots per GPU, the experts' host tier, CPU threads and prefetch
width. Pure arithmetic: it loads no weights, so it answers "will it fit, and how?" before a download."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .chunking import ExpertLayer, activation_bytes_per_token, predicted_prefill_tok_s, size_prefill

GiB = 1 << 30
DISK_EFFICIENCY = 0.8  # of the disk's sequential read rate, reached by the disk tier at decode (bench/RESULTS.md)
DISK_HEADROOM = 1 << 28  # RAM kept free beside a disk tier (as offload.disk does): KV cache, activations
PREFILL_PROMPTS = (512, 4096, 8192)  # prompt lengths whose prefill rate the plan predicts


@dataclass(frozen=True, slots=True)
class Footprint:
    """A model's sizes as it will run: non-expert weights per layer, embeddings and head, one expert in a GPU slot
    and on the host, KV bytes per token per layer."""
    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    experts_per_layer: tuple[int, ...]  # 0 for dense layers
    expert_slot_bytes: int
    expert_host_bytes: int
    kv_bytes_per_token: tuple[int, ...]
    top_k: int
    expert_bytes_by_layer: tuple[int, ...] | None = None  # all experts of each layer, when types differ by layer
    act_bytes_per_token: int = 0  # a prefill token's activations on its GPU (offload.chunking)
    expert_flops_per_token: float = 0.0  # one expert's gate, up and down for one token
    dense_flops_per_token: float = 0.0  # everything else a token's forward pass multiplies (attention, shared, head)

    @property
    def expert_host_total(self) -> int:
        if self.expert_bytes_by_layer is not None:
            return sum(self.expert_bytes_by_layer)
        return sum(self.experts_per_layer) * self.expert_host_bytes


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    bytes_total: int
    bytes_free: int


@dataclass(frozen=True, slots=True)
class Hardware:
    gpus: tuple[GPU, ...]
    ram_total: int
    ram_available: int
    cpu_cores: int
    h2d_bytes_per_s: float = 25e9
    cpu_read_bytes_per_s: float = 50e9
    disk_read_bytes_per_s: float = 2e9
    gpu_flops: float = 100e12  # the GPUs' grouped matrix products at prefill (bf16)


@dataclass(slots=True)
class PlanOptions:
    context: int = 4096
    batch: int = 1
    vram_reserve: int = int(1.5 * GiB)  # per GPU: CUDA context, activations, allocator slack
    vram_margin: float = 0.05  # fraction of each GPU kept free on top of the reserve
    ram_fraction: float = 0.85  # of available RAM that pinned experts may take
    experts_tier: str = "auto"  # "auto", "pinned" or "mmap"
    max_slots: int | None = None  # cap per GPU (the user's --expert-cache-slots)
    prefetch_margin: int = 2

    def __post_init__(self):
        if self.context < 1 or self.batch < 1:
            raise ValueError("context and batch must be >= 1")
        if self.experts_tier not in ("auto", "pinned", "mmap"):
            raise ValueError(f"experts tier {self.experts_tier!r}: use auto, pinned or mmap")


@dataclass(slots=True)
class DevicePlan:
    name: str
    bytes_total: int
    bytes_weights: int
    bytes_kv: int
    bytes_slots: int
    expert_slots: int
    layers: list[int]
    prefill_chunk: int = 0  # prompt tokens per forward pass
    staging_rows: int = 0  # expert rows per staging buffer (two buffers) for streamed prefill; 0: all cached
    bytes_prefill: int = 0  # staging buffers and a chunk's activations


@dataclass(slots=True)
class Plan:
    fits: bool
    devices: list[DevicePlan]
    experts: dict
    cpu_threads: int
    prefetch_margin: int
    context: int
    batch: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prefill_chunk: int = 0  # the smallest device's chunk, which the engine uses
    prefill_tok_s: dict[int, float] = field(default_factory=dict)  # prompt tokens -> predicted prefill tokens/s

    def to_json(self) -> dict:
        return asdict(self)


def split_stages(weights: list[int], n: int) -> list[int]:
    """Contiguous stages balanced by bytes: the stage index of each layer."""
    total = sum(weights) or 1
    out, acc = [], 0
    for b in weights:
        out.append(min(n - 1, int((acc + b / 2) * n / total)))
        acc += b
    return out


def make_plan(fp: Footprint, hw: Hardware, opts: PlanOptions | None = None) -> Plan:
    opts = opts or PlanOptions()
    n_layers = len(fp.layer_bytes)
    tokens = opts.context * opts.batch
    problems, notes = [], []
    host_total = fp.expert_host_total
    budget = int(hw.ram_available * opts.ram_fraction)
    tier = opts.experts_tier
    if tier == "auto":
        tier = "pinned" if host_total <= budget else "mmap"
    if tier == "pinned" and host_total > budget:
        problems.append(f"pinned experts need {host_total / GiB:.1f} GiB of RAM but {budget / GiB:.1f} GiB is "
                        "available; use --experts-tier mmap")
    disk = disk_tier(fp, hw) if tier == "mmap" else None
    if disk is not None:
        notes.append(f"experts ({host_total / GiB:.0f} GiB) exceed RAM ({hw.ram_available / GiB:.0f} GiB): the disk "
                     f"tier keeps {disk['resident_bytes'] / GiB:.1f} GiB of them in RAM and reads "
                     f"{disk['read_per_token'] / 2**20:.0f} MiB per token from disk at "
                     f"{hw.disk_read_bytes_per_s / 1e9:.2f} GB/s: about {disk['decode_tok_s']:.2g} tok/s at decode "
                     "(uniform routing; popular experts kept in RAM make it faster)")
    threads = max(1, hw.cpu_cores)
    if not hw.gpus:  # the other weights and the KV cache live in RAM too, beside pinned experts or the page cache
        rest = fp.embed_bytes + fp.head_bytes + sum(fp.layer_bytes)
        kv = sum(fp.kv_bytes_per_token) * tokens
        need = rest + kv + (host_total if tier == "pinned" else 0)
        if need > hw.ram_available:
            fixes = [f"a smaller --ctx (KV takes {kv / GiB:.1f} GiB at {opts.context})"] if kv > rest / 4 else []
            fixes += ["a GGUF file with smaller types", "a machine with more RAM or a GPU"]
            problems.append(f"RAM: the weights other than routed experts ({rest / GiB:.1f} GiB) and the KV cache "
                            f"({kv / GiB:.1f} GiB at context {opts.context})"
                            + (f" and pinned experts ({host_total / GiB:.1f} GiB)" if tier == "pinned" else "")
                            + f" need {need / GiB:.1f} GiB but {hw.ram_available / GiB:.1f} GiB is available: "
                            f"{(need - hw.ram_available) / GiB:.1f} GiB short; to fit: " + ", or ".join(fixes))
        experts = {"tier": tier, "bytes": host_total, "cache_slots_total": 0} | ({"disk": disk} if disk else {})
        return Plan(not problems, [], experts, threads,
                    0, opts.context, opts.batch, problems, notes + ["no GPU: everything runs on the CPU"])

    per_layer = [w + kv * tokens for w, kv in zip(fp.layer_bytes, fp.kv_bytes_per_token)]
    stages = split_stages(per_layer, len(hw.gpus))
    devices, rooms = [], []
    for s, gpu in enumerate(hw.gpus):
        layers = [i for i in range(n_layers) if stages[i] == s]
        weights = sum(fp.layer_bytes[i] for i in layers)
        weights += (fp.embed_bytes if s == 0 else 0) + (fp.head_bytes if s == len(hw.gpus) - 1 else 0)
        kv = sum(fp.kv_bytes_per_token[i] for i in layers) * tokens
        usable = int(gpu.bytes_free * (1 - opts.vram_margin)) - opts.vram_reserve
        room = usable - weights - kv
        if room < 0:
            problems.append(f"GPU {s} ({gpu.name}) needs {(weights + kv) / GiB:.1f} GiB for layers "
                            f"{layers[0]}-{layers[-1]} (weights {weights / GiB:.1f}, KV {kv / GiB:.1f} at context "
                            f"{opts.context}) but has {usable / GiB:.1f} GiB usable: {-room / GiB:.1f} GiB short")
        devices.append(DevicePlan(gpu.name, gpu.bytes_total, weights, kv, 0, 0, layers))
        rooms.append(room)
    # As the runtime sizes them: where one GPU streams experts at prefill, every GPU takes a share (expert parallel)
    for stream in (False, True):
        for d, room in zip(devices, rooms):
            sizes = size_prefill(room, stage_experts=sum(fp.experts_per_layer[i] for i in d.layers),
                                 layer_experts=max(fp.experts_per_layer), slot_bytes=fp.expert_slot_bytes,
                                 per_token=fp.act_bytes_per_token, context=opts.context, max_slots=opts.max_slots,
                                 stream=stream)
            d.expert_slots, d.bytes_slots = sizes.slots, sizes.slots * fp.expert_slot_bytes
            d.prefill_chunk, d.staging_rows = sizes.chunk, sizes.staging_rows
            d.bytes_prefill = sizes.staging_bytes + sizes.activation_bytes
        if len(devices) == 1 or not any(d.staging_rows for d in devices):
            break
    if problems and any("short" in p for p in problems):
        short = [p for p in problems if "short" in p]
        fixes = []
        kv_total = sum(d.bytes_kv for d in devices)
        if kv_total > GiB:
            fixes.append(f"a smaller --ctx (KV takes {kv_total / GiB:.1f} GiB at {opts.context})")
        fixes.append("more GPUs (--devices)")
        fixes.append("a smaller quantization of the attention and dense layers")
        problems[-1 if short else 0] += "; to fit: " + ", or ".join(fixes)
    total_slots = sum(d.expert_slots for d in devices)
    frac = total_slots / max(1, sum(fp.experts_per_layer))
    notes.append(f"GPU expert cache: {total_slots} slots ({100 * frac:.0f}% of all experts)")
    margin = 0 if frac >= 1 else opts.prefetch_margin
    chunk = min(d.prefill_chunk for d in devices)
    # with the mmap tier, the share of the experts' bytes that RAM cannot hold is read from disk at every chunk
    disk_share = max(0.0, 1 - hw.ram_available / host_total) if tier == "mmap" and host_total else 0.0
    links = max(1, sum(1 for d in devices if d.staging_rows))  # each streaming GPU copies over its own link
    rates = {n: predicted_prefill_tok_s(n, chunk, _expert_layers(fp, devices), fp.top_k, fp.expert_flops_per_token,
                                        links * hw.h2d_bytes_per_s, links * hw.gpu_flops, disk_share,
                                        hw.disk_read_bytes_per_s, fp.dense_flops_per_token)
             for n in PREFILL_PROMPTS} if fp.top_k and fp.expert_flops_per_token else {}
    if rates:
        bound = _prefill_bound(fp, devices, chunk, hw, disk_share, links)
        notes.append(f"prefill: chunks of {chunk} tokens; predicted {rates[PREFILL_PROMPTS[-1]]:.0f} tok/s for a "
                     f"{PREFILL_PROMPTS[-1]}-token prompt ({bound})")
    experts = {"tier": tier, "bytes": host_total, "cache_slots_total": total_slots} | ({"disk": disk} if disk else {})
    return Plan(not problems, devices, experts, threads, margin, opts.context, opts.batch, problems, notes, chunk,
                rates)


def _expert_layers(fp: Footprint, devices: list[DevicePlan]) -> list[ExpertLayer]:
    """What each MoE layer's prefill copies and computes, with the share of its GPU's experts that GPU caches."""
    out = []
    for d in devices:
        experts = sum(fp.experts_per_layer[i] for i in d.layers)
        for i in d.layers:
            if fp.experts_per_layer[i]:
                nbytes = (fp.expert_bytes_by_layer[i] if fp.expert_bytes_by_layer is not None
                          else fp.experts_per_layer[i] * fp.expert_host_bytes)
                out.append(ExpertLayer(fp.experts_per_layer[i], nbytes, min(1.0, d.expert_slots / max(1, experts))))
    return out


def _prefill_bound(fp: Footprint, devices: list[DevicePlan], chunk: int, hw: Hardware, disk: float,
                   links: int) -> str:
    """Why the prediction is what it is: per chunk, the expert bytes that cross PCIe (and come from disk) and the
    compute, both shared by the streaming GPUs."""
    layers = _expert_layers(fp, devices)
    copy = sum((1 - lay.cached) * (1 - (1 - fp.top_k / lay.experts) ** chunk) * lay.nbytes for lay in layers)
    flops = chunk * (fp.top_k * fp.expert_flops_per_token * len(layers) + fp.dense_flops_per_token)
    over = f"{links} links of " if links > 1 else ""
    from_disk = (f", {100 * disk:.0f}% of it from disk at {hw.disk_read_bytes_per_s / 1e9:.1f} GB/s = "
                 f"{disk * copy / hw.disk_read_bytes_per_s:.2f} s" if disk else "")
    return (f"per chunk {copy / GiB:.1f} GiB of experts over {over}PCIe at {hw.h2d_bytes_per_s / 1e9:.0f} GB/s = "
            f"{copy / (links * hw.h2d_bytes_per_s):.2f} s{from_disk}, compute {flops / (links * hw.gpu_flops):.2f} s "
            f"at {hw.gpu_flops / 1e12:.0f} TFLOP/s per GPU")


def disk_tier(fp: Footprint, hw: Hardware) -> dict | None:
    """Where the routed experts do not fit in RAM (with the other weights, when no GPU holds those): the bytes kept
    in RAM, the bytes read from disk per decoded token with uniform routing, and the decode rate that the disk and
    the CPU then allow (offload.disk reads at about DISK_EFFICIENCY of the disk's sequential rate)."""
    others = 0 if hw.gpus else sum(fp.layer_bytes) + fp.embed_bytes + fp.head_bytes
    room = max(0, hw.ram_available - others - max(DISK_HEADROOM, hw.ram_available // 8))
    total = fp.expert_host_total
    if total <= room:
        return None
    resident = room / total
    moe = sum(1 for n in fp.experts_per_layer if n)
    active = moe * fp.top_k * fp.expert_host_bytes
    read = active * (1 - resident)
    disk_s = read / (hw.disk_read_bytes_per_s * DISK_EFFICIENCY)
    cpu_s = (active + (others if not hw.gpus else 0)) / hw.cpu_read_bytes_per_s
    return {"resident_bytes": int(room), "read_per_token": int(read), "disk_read_bytes_per_s": hw.disk_read_bytes_per_s,
            "decode_tok_s": 1.0 / (disk_s + cpu_s)}


def footprint_from_config(cfg: dict, weight_bytes: float = 2.0, expert_bytes: float | None = None,
                          kv_bytes: int = 2) -> Footprint:
    """Sizes from an HF config.json. weight_bytes: bytes per parameter of the GPU-resident weights (bf16: 2);
    expert_bytes: bytes per expert parameter on the host and in a slot (default: as the checkpoint stores them)."""
    import torch

    from ..models.loader import model_args
    family, args = model_args(cfg)
    with torch.device("meta"):
        model = family.build(args)
    moe = set(model.moe_layers())
    inter, dim = args.expert_shape
    if expert_bytes is None:
        fp8 = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
        expert_bytes = 1.0 + 4 / (128 * 128) if fp8 else weight_bytes
    per_expert = int(math.ceil(3 * inter * dim * expert_bytes))
    layer_bytes = tuple(int(sum(p.numel() for p in b.parameters()) * weight_bytes) for b in model.layers)
    kv = tuple(int(sum(math.prod(s) for s in b.attn.cache_shapes()) * kv_bytes) for b in model.layers)
    embed = int(model.tok_embeddings.weight.numel() * weight_bytes)
    head = 0 if args.tie_embeddings else int(model.output.weight.numel() * weight_bytes)
    top_k = args.router.top_k if getattr(args, "router", None) else 0
    dense = 2.0 * (sum(p.numel() for b in model.layers for p in b.parameters()) + model.output.weight.numel())
    return Footprint(cfg.get("model_type", "?"), layer_bytes, embed, head,
                     tuple(args.n_routed_experts if i in moe else 0 for i in range(args.n_layers)),
                     per_expert, per_expert, kv, top_k, None, activation_bytes_per_token(dim, inter, top_k),
                     6.0 * dim * inter, dense)


def footprint_from_gguf(path, weight_bytes: float = 2.0, kv_bytes: int = 2,
                        layers_as_stored: bool = False) -> Footprint:
    """Sizes from a GGUF file's header: experts as stored (host and slots hold the blocks), the other weights at
    `weight_bytes` per parameter (they are widened to bf16 on the GPU), or as stored (layers_as_stored: the CPU
    runs them quantized)."""
    from ..formats.gguf import GGUFFile, hf_config
    f = GGUFFile(path)
    if layers_as_stored:
        rest = [t for name, t in f.tensors.items() if "_exps." not in name and len(t.shape) > 1]
        weight_bytes = sum(t.nbytes for t in rest) / max(1, sum(math.prod(t.shape) for t in rest))
    base = footprint_from_config(hf_config(f), weight_bytes=weight_bytes, kv_bytes=kv_bytes)
    per_layer: dict[int, int] = {}
    for name, t in f.tensors.items():
        if "_exps." in name:
            layer = int(name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + t.nbytes
    by_layer = tuple(per_layer.get(i, 0) for i in range(len(base.layer_bytes)))
    # a slot must hold the largest layer's expert (Q4_K_M gives some layers' down projections Q6_K)
    per_expert = max((b // n for b, n in zip(by_layer, base.experts_per_layer) if n), default=0)
    return replace(base, expert_slot_bytes=per_expert, expert_host_bytes=per_expert, expert_bytes_by_layer=by_layer)
