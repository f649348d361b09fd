"""The engine object behind hybridmoe.load(): a loaded model, its tokenizer, and generation entry points."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ConfigError, ContextOverflowError
from ..layers.attention import stack_qkv_projections
from ..layers.cache import Batch
from ..models.graphs import DecodeGraphs
from ..models.loader import LoadedModel, load_hf, read_config
from ..formats.gguf import GGUFFile, hf_config
from ..offload.disk import attach as attach_disk_tier
from ..offload.plan import footprint_from_config, split_stages
from ..offload.runtime import OffloadOptions, OffloadRuntime, activation_modes, make_store, stage_devices
from .config import GenerationConfig
from .events import Event
from .generate import generate_loop
from .text import prompt_opens_think
from .tokenizer import Tokenizer

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
DTYPES = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "f16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device cuda:{index}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _as_ids(x) -> list[int]:
    return [] if x is None else [int(i) for i in (x if isinstance(x, list) else [x])]


class Engine:
    """A loaded model ready to generate. Build it with hybridmoe.load()."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer | None, path: Path, device: torch.device,
                 dtype: torch.dtype, context: int | None = None):
        self.loaded, self.tokenizer, self.path = loaded, tokenizer, path
        self.model, self.args, self.config = loaded.model, loaded.args, loaded.config
        self.device, self.dtype = device, dtype
        limit = int(self.config.get("max_position_embeddings") or 4096)
        sliding = getattr(self.args, "sliding_window", None)
        if sliding:
            limit = min(limit, int(sliding))  # past the window the reference attends differently
        self.max_context = min(context, limit) if context else min(limit, 4096)
        self.cancel = threading.Event()

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError(f"{self.path}: no tokenizer.json, so text cannot be generated; pass token ids instead")
        return self.tokenizer

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits [T, vocab] (f32) for evaluation; no cache."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        if len(token_ids) > self.max_context:
            raise ContextOverflowError(f"{len(token_ids)} tokens exceed the context of {self.max_context}; "
                                       "raise --ctx or pass fewer tokens")
        self._check_ids(token_ids)
        with torch.inference_mode():
            batch = Batch.make([0], [len(token_ids)], None, self.device)
            return self.model(torch.tensor([token_ids], device=self.device), batch)[0]

    def _check_ids(self, token_ids: list[int]) -> None:
        vocab = self.args.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def generate(self, prompt_or_messages: str | list[dict] | list[int], config: GenerationConfig | None = None,
                 **overrides) -> Iterator[Event]:
        """Events for a completion of a plain prompt (str), of token ids (list of int), or of a conversation
        (list of role/content dicts)."""
        cfg = (config or GenerationConfig()).updated(**overrides)
        if isinstance(prompt_or_messages, str):
            return self._run(self._tok().encode(prompt_or_messages), cfg, prompt_opens_think(prompt_or_messages))
        items = list(prompt_or_messages)
        if items and all(isinstance(t, int) for t in items):
            self._check_ids(items)
            return self._run(items, cfg, False)
        return self.chat(items, cfg)

    def chat(self, messages: list[dict], config: GenerationConfig | None = None, **overrides) -> Iterator[Event]:
        """Events for the assistant's next turn, with the model's own chat template."""
        tok = self._tok()
        cfg = (config or GenerationConfig()).updated(**overrides)
        ids, text = tok.encode_chat(messages)
        return self._run(ids, cfg, prompt_opens_think(text))

    def _run(self, ids: list[int], cfg: GenerationConfig, in_think: bool) -> Iterator[Event]:
        self.cancel.clear()
        eos = self.tokenizer.eos_ids if self.tokenizer else set(_as_ids(self.config.get("eos_token_id")))
        return generate_loop(self.model, self.tokenizer, eos, ids, cfg, max_context=self.max_context, in_think=in_think,
                             cancel=self.cancel)

    def stop(self) -> None:
        """Ask a running generation to end after the current step (thread-safe)."""
        self.cancel.set()


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         context: int | None = None, *, accelerator: str | None = None, devices: int = 1,
         expert_cache_slots: int | None = None, prefetch: bool = True, experts_tier: str = "mmap",
         cost_model=None, cpu_repack: bool = False, prefetch_margin: int = 2, cpu_activations: str = "f32",
         cuda_graphs: bool = True, memory_budget: int | None = None) -> Engine:
    """Load a model directory (HF config.json + safetensors + tokenizer.json) or a GGUF file (`x.gguf`, or any part
    of a split `x-00001-of-0000N.gguf`). No path: the built-in demo model.

    With device="cuda" (or accelerator="cpu", which simulates the GPUs on the CPU) the routed experts stay on the
    host and run through the offload engine: `devices` pipeline stages, `expert_cache_slots` GPU slots per device
    (None: as many as fit; 0: no cache), router-predicted `prefetch` of the top (k + `prefetch_margin`) experts,
    and the host tier `experts_tier`
    ("mmap" or "pinned"). `cost_model` (offload.scheduler.CostModel) holds the machine's measured rates; the
    default is a conservative workstation's. `cpu_repack` (GGUF) gives CPU-served experts a lane-interleaved copy
    that decodes faster; it sums in another order, so results then match within kernel tolerance.
    `cpu_activations` (GGUF): "f32" (exact) or "int8", which rounds x to 8 bits per group of 32 in the decode
    kernels of CPU experts, as llama.cpp does: several times less compute, and all CPU experts of a layer in one
    call per decode step, read in place on the mmap tier (Q2_K to Q6_K, Q8_0, IQ4_XS; layers of other
    types get the repacked copy).
    "int8-all" also rounds the inputs of the other quantized linear layers on the CPU (attention, output head) at
    decode, as llama.cpp does: faster, but logits move much more than with "int8" (bench/RESULTS.md), so it is
    never the default.
    `cuda_graphs` replays each layer's non-expert work at decode as a captured CUDA graph (much less host time per
    token; attention then spans a masked window of keys, so results match eager decode within bf16 rounding).
    `memory_budget` (GGUF on the CPU): bytes the process may hold, page cache included (None: the memory cgroup's
    limit or the RAM available). Routed experts beyond it are read from disk ahead of need, the most used ones kept
    in RAM (offload.disk); `prefetch` and `prefetch_margin` then steer the reads of predicted experts."""
    path = Path(path) if path is not None else DEMO_MODEL
    if memory_budget is not None and memory_budget <= 0:
        raise ConfigError(f"--memory-budget {memory_budget}: must be a positive number of bytes")
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    gguf = path.suffix == ".gguf"
    activation_modes(cpu_activations)  # an unknown mode is an error whatever the model
    if accelerator is None and dev.type == "cuda":
        accelerator = "cuda"
    if accelerator is None:
        if devices != 1 or expert_cache_slots is not None:
            raise ConfigError("--devices and --expert-cache-slots need --device cuda or --accelerator cpu")
        loaded = _load_gguf(path, dev, dt, experts_tier, cpu_activations=cpu_activations) if gguf \
            else load_hf(path, dev, dt)
        if gguf and dev.type == "cpu":  # experts beyond the memory budget are read from disk ahead of need
            attach_disk_tier(loaded.model, loaded.model.experts, memory_budget, prefetch, prefetch_margin)
    else:
        opts = OffloadOptions(accelerator, devices, expert_cache_slots, prefetch, prefetch_margin, experts_tier,
                              cpu_repack=cpu_repack, cpu_activations=cpu_activations)
        if accelerator == "cuda" and dev.type != "cuda":
            raise ConfigError("--accelerator cuda needs --device cuda")
        if accelerator == "cuda" and devices > torch.cuda.device_count():
            raise ConfigError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) visible")
        stage_devs = stage_devices(opts)
        source = GGUFFile(path) if gguf else path
        fp = footprint_from_config(hf_config(source) if gguf else read_config(path), kv_bytes=dt.itemsize)
        stages = split_stages(list(fp.layer_bytes), devices)  # contiguous stages balanced by bytes
        layer_devs = [stage_devs[s] for s in stages]
        if gguf:
            loaded = _load_gguf(source, stage_devs[0], dt, "mmap", layer_devs, cpu_activations, offloaded=True)
        else:
            loaded = load_hf(path, stage_devs[0], dt, layer_devs, experts_device="cpu")
        model = loaded.model
        ctx = context or 4096
        kv = [ctx * sum(b for b, st in zip(fp.kv_bytes_per_token, stages) if st == s) for s in range(devices)]
        model.experts = OffloadRuntime(model, make_store(model.experts, opts), opts, stages, kv, cost_model)
        dev = stage_devs[0]
    if dev.type == "cuda":
        stack_qkv_projections(loaded.model)  # fewer launches per decode step
    if cuda_graphs and dev.type == "cuda":
        loaded.model.decode_graphs = DecodeGraphs(loaded.model)
    tokenizer = getattr(loaded, "tokenizer", None)
    if not gguf and (path / "tokenizer.json").exists():
        tokenizer = Tokenizer(path, loaded.config)
    return Engine(loaded, tokenizer, path, dev, dt, context)


# --- GGUF files (llama.cpp's format): non-expert weights dequantized, routed experts computed from their bytes ---
def _load_gguf(path, dev: torch.device, dt: torch.dtype, experts_tier: str,
               layer_devices: list[torch.device] | None = None, cpu_activations: str = "f32",
               offloaded: bool = False) -> LoadedModel:
    # offloaded: the experts go on to the offload engine's store, so here they are only carried, not repacked
    from ..models.gguf_loader import load_gguf
    from ..offload.quant_experts import QuantExperts
    from .gguf_tokenizer import GGUFTokenizer, llama_cpp_available

    if experts_tier not in ("mmap", "pinned"):
        raise ConfigError(f"--experts-tier {experts_tier!r} is not one of mmap, pinned")
    experts_acts, linear_acts = activation_modes(cpu_activations)
    loaded, experts = load_gguf(path, dev, dt, layer_devices, linear_acts)
    # "pinned" (experts copied into RAM) is, for CPU-computed experts, the kernels' packed layout
    packed = not offloaded and experts_tier == "pinned"
    loaded.model.experts = QuantExperts(experts, tier="packed" if packed else "mmap",
                                        activations="f32" if offloaded else experts_acts)
    # Without llama-cpp-python the model still scores token ids; text needs its tokenizer.
    file = path.path if isinstance(path, GGUFFile) else path
    loaded.tokenizer = GGUFTokenizer(file, loaded.config.get("chat_template")) if llama_cpp_available() else None
    return loaded
# --- end GGUF ---