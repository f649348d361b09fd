"""Load a GGUF model: metadata -> config dict -> ModelArgs -> module tree on the meta device. Non-expert tensors are
dequantized to the model dtype; routed experts stay as the file stores them (one expert is a contiguous byte range
of `ffn_{gate,up,down}_exps`) and are returned as such, for an Experts object of the offload layer to compute.
Strict like the HF loader: every tensor we expect must be present with its shape, and nothing else may be."""
from __future__ import annotations

import re

import numpy as np
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelFileError
from ..formats.families import GGUF_ROPE_PERMUTED, GGUF_TENSORS
from ..formats.gguf import GGUFFile, GGUFTensor, hf_config, metadata_names
from ..formats.gguf_names import GGUF_IGNORED
from ..formats.names import NameMap
from ..quant import dequantize, get_format
from .loader import F32_PARAMS, LoadedModel, counted, model_args, param_device, tie_output

LAYER = re.compile(r"blk\.(\d+)\.")
PROJ_SHAPES = {"gate": lambda inter, dim: (inter, dim), "up": lambda inter, dim: (inter, dim),
               "down": lambda inter, dim: (dim, inter)}


def dequantize_tensor(t: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A GGUF tensor as a torch tensor of `dtype` (F32 tensors alias the file when dtype is f32)."""
    try:
        out = torch.from_numpy(dequantize(t.raw, t.qtype, t.shape))
    except ValueError as e:
        raise ModelFileError(f"{t.file}: tensor {t.name!r}: {e}") from None
    return out.to(dtype)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (pairs interleaved within each head) back to halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [H, R, N] and attn_v_b [H, V, R] -> our wkv_b [H*(N+V), R]."""
    H, R, _ = k_b.shape
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, R)


# Linear layers whose weight is read directly elsewhere (MLA folds wkv_b into the query and output) stay dense.
_DENSE_ONLY = (".attn.wkv_b",)


def quantized_linears(model, found: dict[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """The linear layers that keep_quantized turns into QuantLinear: module name -> its weight's tensor."""
    from ..layers.quant_linear import QuantLinear
    return {name: found[name + ".weight"] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name + ".weight" in found and not name.endswith(_DENSE_ONLY)
            and QuantLinear.supports(found[name + ".weight"].qtype)}


def keep_quantized(model, found: dict[str, GGUFTensor], permuted, activations: str = "f32",
                   parts: dict[str, dict[str, GGUFTensor]] | None = None) -> None:
    """On the CPU, linear layers keep their GGUF blocks (QuantLinear) instead of dequantized f32 weights, and an
    attention's q, k and v projections (MLA: wq_a and wkv_a) are stacked into one, and an MLP's three layers decode
    in one call (with 8-bit activations). activations: QuantLinear's decode activations. MLA's absorbed decode reads
    attn_k_b / attn_v_b as stored (parts: our name -> those pieces), where their type has a row kernel."""
    from ..kernels import cpu as ck
    from ..layers.attention import stack_qkv_projections
    from ..layers.mla import MLA
    from ..layers.mlp import MLP
    from ..layers.quant_linear import QuantLinear
    for name, t in quantized_linears(model, found).items():
        module = model.get_submodule(name)
        raw = t.raw
        heads = next((h for p, h in permuted if p.match(name + ".weight")), None)
        if heads is not None:  # whole rows move, so the blocks can be permuted as they are
            raw = unpermute_rope_rows(torch.from_numpy(np.ascontiguousarray(raw)), heads).numpy()
        bias = module.bias.detach().float() if module.bias is not None else None
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                QuantLinear(raw, t.qtype, module.out_features, module.in_features, bias, activations))
    stack_qkv_projections(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MLA):
            module.stack_inputs()
            pieces = (parts or {}).get(name + ".wkv_b.weight", {})
            k_b, v_b = pieces.get("k_b"), pieces.get("v_b")
            block = get_format(k_b.qtype).block_size if k_b is not None else 0
            if (v_b is not None and k_b.qtype == v_b.qtype and k_b.qtype in ck.GEMV_TYPES
                    and module.s.nope_dim % block == 0 and module.s.kv_lora_rank % block == 0):
                module.keep_absorbed_raw(np.ascontiguousarray(k_b.raw), np.ascontiguousarray(v_b.raw), k_b.qtype)
        elif isinstance(module, MLP):
            module.fuse()


def keep_quantized_on_gpu(model, found: dict[str, GGUFTensor], permuted) -> None:
    """On CUDA, linear layers whose type the GPU kernels take keep their GGUF blocks on their layer's device
    (GpuQuantLinear) instead of the dequantized copies the state dict put there (freed here)."""
    from ..layers.gpu_quant_linear import GpuQuantLinear
    for name, module in list(model.named_modules()):
        t = found.get(name + ".weight")
        if (not isinstance(module, torch.nn.Linear) or t is None or name.endswith(_DENSE_ONLY)
                or module.weight.device.type != "cuda" or not GpuQuantLinear.supports(t.qtype)):
            continue
        raw = torch.from_numpy(np.ascontiguousarray(t.raw))
        heads = next((h for p, h in permuted if p.match(name + ".weight")), None)
        if heads is not None:  # whole rows move, so the blocks can be permuted as they are
            raw = unpermute_rope_rows(raw, heads)
        bias = module.bias.detach() if module.bias is not None else None
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                GpuQuantLinear(raw.to(module.weight.device), t.qtype, module.out_features, module.in_features, bias))


def _split_shapes(args) -> dict[str, tuple[int, ...]]:
    m = args.mla
    return {"k_b": (m.n_heads, m.kv_lora_rank, m.nope_dim), "v_b": (m.n_heads, m.v_dim, m.kv_lora_rank)}


ExpertTensors = dict[int, tuple[GGUFTensor, GGUFTensor, GGUFTensor]]  # layer -> (gate, up, down), each [E, ...]


def load_gguf(path: str | Path | GGUFFile, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              layer_devices: list[torch.device] | None = None,
              linear_activations: str = "f32", gpu_blocks: bool = False,
              progress: Callable[[float], None] | None = None) -> tuple[LoadedModel, ExpertTensors]:
    """The model with every non-expert weight filled, and its routed experts as raw GGUF tensors (the caller sets
    `model.experts`). layer_devices: one device per layer (pipeline stages; default all on `device`).
    linear_activations: "f32", or "int8" to round the inputs of the CPU's quantized linear layers to 8 bits at
    decode (layers.quant_linear). gpu_blocks: linear layers on CUDA keep their GGUF blocks (GpuQuantLinear).
    progress(fraction) is called as the tensors are read."""
    gf = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = hf_config(gf)
    family, args = model_args(cfg, f"{gf.path} (GGUF metadata)", metadata_names(gf.arch))
    with torch.device("meta"):
        model = family.build(args)
    names = NameMap(GGUF_TENSORS[gf.arch], ignored=GGUF_IGNORED)

    params = dict(model.state_dict())
    if args.tie_embeddings:
        params.pop("output.weight")
    wanted = {k: tuple(v.shape) for k, v in params.items()}
    n_experts, (inter, dim) = args.n_routed_experts, args.expert_shape
    for i in model.moe_layers():
        for p, shape in PROJ_SHAPES.items():
            wanted[f"layers.{i}.experts.{p}"] = (n_experts, *shape(inter, dim))
    found: dict[str, GGUFTensor] = {}
    parts: dict[str, dict[str, GGUFTensor]] = {}  # our name -> pieces it is assembled from
    for name, t in gf.tensors.items():
        m = LAYER.match(name)
        if names.ignored(name) or (m and int(m[1]) >= args.n_layers):
            continue  # unused tensors, and multi-token-prediction layers past the decoder stack
        mapped = names(name)
        if mapped is None:
            raise ModelFileError(f"{t.file}: unexpected tensor {name!r} for GGUF architecture {gf.arch!r}")
        ours, _ = mapped
        ours, _, part = ours.partition(":")
        if ours not in wanted:
            raise ModelFileError(f"{t.file}: unexpected tensor {name!r} (this model has no {ours})")
        want = _split_shapes(args)[part] if part else wanted[ours]
        if t.shape != want:
            raise ModelFileError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, expected {list(want)} "
                                 "from the file's metadata")
        if part:
            parts.setdefault(ours, {})[part] = t
        else:
            found[ours] = t
    for ours, pieces in parts.items():
        if ours in found or set(pieces) != {"k_b", "v_b"}:
            raise ModelFileError(f"{gf.path}: {ours} needs either attn_kv_b or both attn_k_b and attn_v_b; "
                                 f"found {', '.join(sorted(pieces))}{' and attn_kv_b' if ours in found else ''}")
    missing = [k for k in wanted if k not in found and k not in parts]
    if missing:
        raise ModelFileError(f"{gf.path}: missing tensor(s) for {', '.join(missing[:3])}"
                             f"{' and %d more' % (len(missing) - 3) if len(missing) > 3 else ''}; "
                             "the file is incomplete or does not match its metadata")

    devices = layer_devices or [torch.device(device)] * args.n_layers
    permuted = [(re.compile(re.escape(k).replace(r"\{i\}", r"\d+") + "$"), cfg[v])
                for k, v in GGUF_ROPE_PERMUTED.get(gf.arch, {}).items()]

    # On the CPU most linear layers keep their blocks (keep_quantized): they are never dequantized, so that loading
    # needs no more memory than running (a model larger than RAM must not hold f32 copies of its attention).
    quantized = set() if args.tie_embeddings or any(d.type != "cpu" for d in devices) else \
        {name + ".weight" for name in quantized_linears(model, found)}

    def fetch(ours: str) -> torch.Tensor:
        if ours in quantized:
            return torch.empty(params[ours].shape, device="meta")  # replaced by a QuantLinear below
        want = torch.float32 if ours.endswith(F32_PARAMS) else dtype
        if ours in parts:
            w = join_kv_b(dequantize_tensor(parts[ours]["k_b"]), dequantize_tensor(parts[ours]["v_b"]))
        else:
            w = dequantize_tensor(found[ours])
            heads = next((h for p, h in permuted if p.match(ours)), None)
            if heads is not None:
                w = unpermute_rope_rows(w, heads)
        return w.to(device=param_device(ours, devices), dtype=want)

    tie_output(model, {k: fetch(k) for k in counted(params, progress)}, args, devices)
    if not args.tie_embeddings and all(d.type == "cpu" for d in devices):
        keep_quantized(model, found, permuted, linear_activations, parts)
    elif gpu_blocks:
        keep_quantized_on_gpu(model, found, permuted)
    model.layer_devices = list(devices) if layer_devices else None
    experts = {i: tuple(found[f"layers.{i}.experts.{p}"] for p in PROJ_SHAPES) for i in model.moe_layers()}
    for t in (t for projs in experts.values() for t in projs):
        try:
            get_format(t.qtype)  # experts are computed lazily: refuse an unsupported type now, not mid-generation
        except ValueError as e:
            raise ModelFileError(f"{t.file}: tensor {t.name!r}: {e}") from None
    model.eval()
    return LoadedModel(family, args, model, cfg), experts
