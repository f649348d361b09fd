"""Load an HF model directory: config.json -> ModelArgs -> module tree on the meta device, filled from
mmap'd safetensors. Strict: every tensor we expect must be present with its shape, and nothing else may be."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..errors import ConfigError, ModelFileError
from ..formats.fp8 import dequant_fp8_blocks
from ..formats.names import NameMap
from ..formats.safetensors import SafetensorsFiles, TensorInfo
from ..layers.moe import LocalExperts
from . import family_for
from .common import Transformer
from .validate import EXPERT_COUNTS, check_config

F32_PARAMS = ("ffn.router", "ffn.router_bias")  # routing is computed in f32 whatever the model dtype
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E4M3", "F8_E5M2")
EXPERT_NAME = re.compile(r"layers\.\d+\.experts\.(\d+)\.")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path}: not found (expected an HF model directory with config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ConfigError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    return cfg


def model_args(cfg: dict, where: str = "config.json", names: dict[str, str] | None = None):
    """The family and ModelArgs of a config; `names` spells the keys as the file does (GGUF metadata keys)."""
    family = family_for(cfg, where)
    check_config(cfg, where, names)
    try:
        return family, family.ModelArgs.from_config(cfg)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class LoadedModel:
    family: ModuleType
    args: object
    model: Transformer
    config: dict
    tokenizer: object = None  # GGUF files carry their own


def expected_expert_names(args, model: Transformer) -> dict[str, tuple[int, ...]]:
    inter, dim = args.expert_shape
    shapes = {"gate": (inter, dim), "up": (inter, dim), "down": (dim, inter)}
    return {f"layers.{i}.experts.{e}.{p}": s for i in model.moe_layers() for e in range(args.n_routed_experts)
            for p, s in shapes.items()}


def tie_output(model: Transformer, state: dict[str, torch.Tensor], args, devices: list[torch.device]) -> None:
    """Load `state` into the model; a tied output head shares the embedding (a copy when it sits on another
    pipeline stage's device)."""
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"].to(param_device("output.weight", devices))
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings and model.output.weight.device == model.tok_embeddings.weight.device:
        model.output.weight = model.tok_embeddings.weight


def check_counts(files: SafetensorsFiles, names: NameMap, args, cfg: dict, where: Path) -> None:
    """The layer and expert counts of config.json against the tensors present, before anything is built from
    them: a count of millions must not make millions of modules or names."""
    layers, experts = set(), set()
    for _, _, ours, layer in files.mapped(names, 1 << 31, cfg["model_type"]):
        layers.add(layer)
        m = EXPERT_NAME.match(ours)
        if m:
            experts.add(int(m[1]))
    missing = [i for i in range(args.n_layers) if i not in layers]
    if missing:
        raise ModelFileError(f"{where}: num_hidden_layers is {args.n_layers} but the safetensors files have no "
                             f"tensors for layer {missing[0]}; config.json does not match the weights")
    if args.n_routed_experts > len(experts) and any(args.is_moe(i) for i in range(args.n_layers)):
        key = next((k for k in EXPERT_COUNTS if cfg.get(k)), "n_routed_experts")
        raise ModelFileError(f"{where}: {key} is {args.n_routed_experts} but the safetensors files hold "
                             f"{len(experts)} experts per layer; config.json does not match the weights")


def param_device(name: str, layer_devices: list[torch.device]) -> torch.device:
    """Stage placement: a layer's weights on its stage's device, embeddings on the first, the head on the last."""
    if name.startswith("layers."):
        return layer_devices[int(name.split(".")[1])]
    return layer_devices[0] if name.startswith("tok_embeddings") else layer_devices[-1]


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            layer_devices: list[torch.device] | None = None, experts_device: str | torch.device | None = None
            ) -> LoadedModel:
    """layer_devices: one device per layer (pipeline stages; default all on `device`). experts_device: where routed
    experts are put (default `device`); the offload engine keeps them on the CPU."""
    path = Path(path)
    cfg = read_config(path)
    family, args = model_args(cfg, str(path / "config.json"))
    files = SafetensorsFiles(path)
    names = NameMap(family.NAMES.hf_tensors)
    check_counts(files, names, args, cfg, path / "config.json")
    with torch.device("meta"):
        model = family.build(args)

    params = dict(model.state_dict())
    if args.tie_embeddings:
        params.pop("output.weight")
    wanted = {k: tuple(v.shape) for k, v in params.items()} | expected_expert_names(args, model)
    found: dict[str, TensorInfo] = {}
    for name, info, ours, _ in files.mapped(names, args.n_layers, cfg["model_type"]):
        if ours == "output.weight" and args.tie_embeddings:
            continue
        if ours not in wanted:
            raise ModelFileError(f"{info.file}: unexpected tensor {name!r} (this config has no {ours})")
        if info.shape != wanted[ours]:
            raise ModelFileError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                 f"expected {list(wanted[ours])} from config.json")
        found[ours] = info
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ModelFileError(f"{path}: missing tensor(s) {', '.join(missing[:3])}"
                             f"{' and %d more' % (len(missing) - 3) if len(missing) > 3 else ''}; "
                             "the checkpoint is incomplete or does not match config.json")

    devices = layer_devices or [torch.device(device)] * args.n_layers
    experts_device = experts_device or device

    def fetch(ours: str) -> torch.Tensor:
        info = found[ours]
        if info.dtype not in FLOAT_DTYPES:  # an integer tensor would be converted to floats without a word
            raise ModelFileError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; weights must be one of "
                                 f"{', '.join(FLOAT_DTYPES)}")
        device = experts_device if ".experts." in ours else param_device(ours, devices)
        t = files.get(info.name)
        want = torch.float32 if ours.endswith(F32_PARAMS) else dtype
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = info.name + "_scale_inv"
            if scale_name not in files:
                raise ModelFileError(f"{info.file}: FP8 tensor {info.name!r} has no {scale_name!r}")
            return dequant_fp8_blocks(t, files.get(scale_name), want, args.fp8_block or (128, 128), info.name).to(device)
        return t.to(device=device, dtype=want)  # no copy when dtype and device already match

    state = {k: fetch(k) for k in params}
    tie_output(model, state, args, devices)
    experts = {i: [tuple(fetch(f"layers.{i}.experts.{e}.{p}") for p in ("gate", "up", "down"))
                   for e in range(args.n_routed_experts)] for i in model.moe_layers()}
    model.experts = LocalExperts(experts)
    model.layer_devices = list(devices) if layer_devices else None
    model.eval()
    return LoadedModel(family, args, model, cfg)
