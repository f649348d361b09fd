"""Past one machine: the layouts vLLM and SGLang support for a model on NODES x GPUS, and the memory each GPU needs
under each layout. Pure arithmetic from config.json (or a GGUF header), like plan.py: nothing is loaded.

Letters used below: N nodes, G GPUs per node, W = N * G; L layers, S concurrent sequences, C context tokens."""
from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

GiB = 1 << 30
DATA = Path(__file__).with_name("cluster_engines.toml")
ENGINES = ("vllm", "sglang")
LAYER_CATEGORIES = ("attention", "dense", "shared_experts", "routers", "norms")  # summarize()'s, besides these two:
# embeddings (embedding table and output head) and routed_experts


@functools.cache
def engine_data() -> dict:
    """The engines' flag names and versions, the GPU table and the estimate's assumptions (cluster_engines.toml)."""
    with open(DATA, "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True, slots=True)
class GPUSpec:
    name: str
    memory_gib: float
    hbm_tb_s: float = 0.0  # 0: unknown (a GPU given by its memory size only); no throughput estimate then
    tflops_bf16: float = 0.0
    tflops_fp8: float = 0.0
    link_gb_s: float = 0.0
    nic_gb_s: float = 0.0

    @property
    def bytes(self) -> int:
        return int(self.memory_gib * GiB)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    gpu: GPUSpec

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def label(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node} {self.gpu.name}"


def gpu_spec(name: str) -> GPUSpec:
    table = engine_data()["gpus"]
    want = name.strip().lower()
    for key, g in table.items():
        if want in [key.lower()] + [a.lower() for a in g.get("aliases", ())]:
            return GPUSpec(key, g["memory_gib"], g["hbm_tb_s"], g["tflops_bf16"], g["tflops_fp8"], g["link_gb_s"],
                           g["nic_gb_s"])
    raise ConfigError(f"--cluster: unknown GPU {name!r}; known: {', '.join(table)}, or a memory size such as 80GiB")


_SPEC = re.compile(r"(\d+)x(\d+)(?::(.+))?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(gib|gb|g)")
DEFAULT_GPU = "H100-80GB"


def parse_cluster(text: str) -> ClusterSpec:
    """NODESxGPUS[:GPU_NAME|:VRAM], e.g. 2x8:H100-80GB, 4x8:A100-40GB, 1x8:96GiB (default GPU: H100-80GB)."""
    m = _SPEC.fullmatch(text.strip().lower())
    hint = "expected NODESxGPUS[:GPU_NAME|:VRAM], e.g. 2x8:H100-80GB or 4x8:80GiB"
    if not m:
        raise ConfigError(f"--cluster {text!r}: {hint}")
    nodes, per_node = int(m[1]), int(m[2])
    if not 1 <= nodes <= 1024 or not 1 <= per_node <= 16:
        raise ConfigError(f"--cluster {text!r}: nodes must be 1-1024 and GPUs per node 1-16")
    gpu = text.strip().split(":", 1)[1] if m[3] else DEFAULT_GPU
    size = _SIZE.fullmatch(gpu.strip().lower())
    if size:
        gib = float(size[1]) * (1e9 / GiB if size[2] == "gb" else 1)
        if not 1 <= gib <= 4096:
            raise ConfigError(f"--cluster {text!r}: GPU memory must be between 1 and 4096 GiB")
        return ClusterSpec(nodes, per_node, GPUSpec(f"{gib:g} GiB GPU", gib))
    return ClusterSpec(nodes, per_node, gpu_spec(gpu))


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the layouts and the memory check need: sizes by category as the checkpoint stores them (summarize()),
    and the dimensions that tensor and expert parallelism must divide."""
    model_type: str
    dtype: str
    fp8_block: int  # 128 for DeepSeek's block-scaled FP8: every TP shard must hold whole blocks; 0 otherwise
    layers: int
    moe_layers: int
    dim: int
    heads: int
    kv_heads: int  # 0 with MLA
    head_dim: int
    mla_latent: int  # cached values per token and layer with MLA (kv_lora_rank + rope dim); 0 with GQA
    experts: int
    top_k: int
    moe_inter: int
    dense_inter: int  # dense MLP layers' width (0: none)
    shared_inter: int  # shared experts' total width (0: none)
    tied_embeddings: bool
    params_active: int
    bytes: dict[str, int] = field(default_factory=dict)

    def kv_values(self, attn_tp: int) -> int:
        """Cached values per token and layer on one GPU of an attention group of attn_tp GPUs. MLA's latent is
        replicated on every GPU of the group; GQA's heads are split, at least one head per GPU."""
        if self.mla_latent:
            return self.mla_latent
        return 2 * self.head_dim * max(1, self.kv_heads // attn_tp)


def model_shape(cfg: dict, as_released: bool = False) -> ModelShape:
    """The shape of an HF config.json. as_released (for a GGUF header's config): size the weights as the upstream
    HF release stores them, FP8 for DeepSeek-V3/R1 and BF16 otherwise, since that is what the engines load."""
    from ..models.loader import model_args
    from ..models.summary import summarize
    if as_released and cfg.get("model_type") == "deepseek_v3":
        cfg = dict(cfg, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    s = summarize(cfg)
    args = model_args(cfg)[1]
    fp8 = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
    mla = getattr(args, "mla", None)  # the DeepSeek family's attention
    dense = s["layers"] > s["moe_layers"] and s["params"]["dense"] > 0
    return ModelShape(
        model_type=s["model_type"], dtype=s["dtype"], fp8_block=128 if fp8 else 0, layers=s["layers"],
        moe_layers=s["moe_layers"], dim=s["hidden_size"], heads=args.n_heads,
        kv_heads=0 if mla else args.n_kv_heads, head_dim=0 if mla else args.head_dim,
        mla_latent=mla.kv_lora_rank + mla.rope_dim if mla else 0, experts=s["routed_experts"],
        top_k=s["experts_per_token"], moe_inter=args.moe_inter_dim, dense_inter=args.inter_dim if dense else 0,
        shared_inter=(cfg.get("n_shared_experts") or 0) * args.moe_inter_dim,
        tied_embeddings=args.tie_embeddings, params_active=s["params_active"], bytes=dict(s["bytes"]))


@dataclass(frozen=True, slots=True)
class Layout:
    """One way to place the model on the cluster, in the engine's own terms. vLLM: dp engines of tp x pp GPUs,
    routed experts spread over all tp * dp GPUs of a stage. SGLang: one server of tp x pp GPUs; attention in attn_dp
    groups inside the tp group, routed experts over the tp group."""
    engine: str
    name: str
    tp: int
    pp: int = 1
    dp: int = 1
    attn_dp: int = 1
    ep: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def attn_tp(self) -> int:
        """GPUs that share one copy of the attention and dense weights (they split it)."""
        return self.tp // self.attn_dp

    @property
    def attn_groups(self) -> int:
        """Attention groups per pipeline stage; each holds the KV cache of its own share of the sequences."""
        return self.dp * self.attn_dp

    @property
    def moe_group(self) -> int:
        """GPUs that share one copy of the routed experts (whole experts with EP, slices of each without)."""
        return self.tp * self.dp


def candidate_layouts(engine: str, nodes: int, per_node: int) -> list[Layout]:
    """The layouts worth comparing: tensor parallel inside a node, then pipeline, data or expert parallel across."""
    w = nodes * per_node
    out: list[Layout] = []
    if engine == "vllm":
        out.append(Layout(engine, "tp+pp" if nodes > 1 else "tp", per_node, pp=nodes))
        if nodes > 1:
            out += [Layout(engine, "tp+dp+ep", per_node, dp=nodes, ep=True), Layout(engine, "tp+dp", per_node,
                                                                                     dp=nodes)]
        if w > 1 and per_node > 1:
            out.append(Layout(engine, "dp+ep", 1, dp=w, ep=True))
    elif engine == "sglang":
        out.append(Layout(engine, "tp", w))
        if w > 1:
            out += [Layout(engine, "tp+ep", w, ep=True), Layout(engine, "dp-attention+ep", w, attn_dp=w, ep=True)]
        if nodes > 1:
            out.append(Layout(engine, "tp+pp", per_node, pp=nodes))
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return out


def unsupported(shape: ModelShape, lay: Layout) -> list[str]:
    """Why the engines cannot shard this model this way (empty: they can)."""
    why = []
    if shape.heads % lay.attn_tp:
        why.append(f"{shape.heads} attention heads do not split over {lay.attn_tp} GPUs")
    if shape.kv_heads and shape.kv_heads % lay.attn_tp and lay.attn_tp % shape.kv_heads:
        why.append(f"{shape.kv_heads} KV heads do not split over {lay.attn_tp} GPUs")
    if lay.pp > shape.layers:
        why.append(f"{shape.layers} layers cannot fill {lay.pp} pipeline stages")

    def split(width: int, parts: int, what: str) -> None:
        unit = shape.fp8_block or 1
        if width and parts > 1 and (width % parts or (width // parts) % unit):
            block = f" in whole {unit}-wide FP8 blocks" if unit > 1 else ""
            why.append(f"{what} ({width} wide) do not split over {parts} GPUs{block}")
    if lay.ep and lay.moe_group > 1:
        if shape.experts % lay.moe_group:
            why.append(f"{shape.experts} routed experts do not spread evenly over {lay.moe_group} GPUs (EP)")
    else:
        split(shape.moe_inter, lay.moe_group, "routed experts")
    split(shape.dense_inter, lay.attn_tp, "dense MLP layers")
    split(shape.shared_inter, lay.attn_tp, "shared experts")
    return why


@dataclass(frozen=True, slots=True)
class GPUMemory:
    """Bytes on one GPU of the fullest pipeline stage."""
    weights: int  # attention, embeddings and head, dense MLP, shared experts, routers, norms
    experts: int  # routed experts
    kv: int  # KV cache for the stated context and concurrency
    reserve: int  # activations, CUDA graphs, communication buffers
    budget: int  # the share of the GPU the engine takes for all of the above
    kv_per_sequence: int  # KV bytes on this GPU for one sequence at the stated context
    sequences_per_group: int  # sequences each attention group holds

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def short(self) -> int:
        return max(0, self.total - self.budget)


def stage_layers(shape: ModelShape, pp: int) -> int:
    """Layers in the fullest pipeline stage (the engines split layers evenly by count)."""
    return -(-shape.layers // pp)


def gpu_memory(shape: ModelShape, lay: Layout, gpu: GPUSpec, context: int, concurrency: int) -> GPUMemory:
    a = engine_data()["assumptions"]
    b = shape.bytes
    ls = stage_layers(shape, lay.pp)
    n_dense = shape.layers - shape.moe_layers
    frac = ls / shape.layers  # per-layer weights that every layer has
    per_layer = (b["attention"] * frac + b["dense"] * (min(ls, n_dense) / n_dense if n_dense else 0)
                 + b["shared_experts"] * min(ls, shape.moe_layers) / max(1, shape.moe_layers)) / lay.attn_tp
    replicated = (b["routers"] + b["norms"]) * frac
    # with pipeline stages the embedding table sits on the first, the output head on the last
    embed = b["embeddings"] / (2 if lay.pp > 1 and not shape.tied_embeddings else 1) / lay.attn_tp
    experts = b["routed_experts"] * min(ls, shape.moe_layers) / max(1, shape.moe_layers) / lay.moe_group
    seqs = -(-concurrency // lay.attn_groups)
    kv_seq = context * ls * shape.kv_values(lay.attn_tp) * a["kv_bytes"]
    return GPUMemory(int(per_layer + replicated + embed), int(experts), seqs * kv_seq, int(a["reserve_gib"] * GiB),
                     int(gpu.bytes * a["memory_fraction"]), kv_seq, seqs)


def max_sequences(mem: GPUMemory, lay: Layout) -> int:
    """Sequences at the stated context that the whole deployment holds in the memory left for KV."""
    room = mem.budget - mem.weights - mem.experts - mem.reserve
    return max(0, room // max(1, mem.kv_per_sequence)) * lay.attn_groups
