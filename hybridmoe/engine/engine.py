"""The engine object behind hybridmoe.load(): a loaded model, its tokenizer, and generation entry points."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import ConfigError, ContextOverflowError, EngineBusyError
from ..layers.attention import stack_qkv_projections
from ..layers.cache import Batch
from ..models.graphs import DecodeGraphs
from ..models.loader import LoadedModel, load_hf, read_config
from ..formats.gguf import GGUFFile, hf_config
from ..offload.chunking import PREFILL_CHUNK
from ..offload.disk import attach as attach_disk_tier
from ..offload.plan import footprint_from_config, split_stages
from ..offload.runtime import OffloadRuntime, activation_modes, make_store, stage_devices
from ..options import Accelerator, GpuWeights, RunOptions, Tier, model_path
from .config import GenerationConfig
from .events import Event
from .generate import generate_loop
from .text import prompt_opens_think
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "f16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": the first CUDA GPU when torch sees one, else the CPU (as llama.cpp and ollama choose)."""
    if str(device) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device cuda:{index}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
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
                 dtype: torch.dtype, context: int | None = None, prefill_chunk: int = PREFILL_CHUNK):
        self.loaded, self.tokenizer, self.path = loaded, tokenizer, path
        self.model, self.args, self.config = loaded.model, loaded.args, loaded.config
        self.device, self.dtype = device, dtype
        limit = int(self.config.get("max_position_embeddings") or 4096)
        sliding = getattr(self.args, "sliding_window", None)
        if sliding:
            limit = min(limit, int(sliding))  # past the window the reference attends differently
        self.max_context = min(context, limit) if context else min(limit, 4096)
        self.cancel = threading.Event()
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass (on a GPU: sized from free VRAM)
        # One model, one KV cache: generations and logits() from several threads take turns (see generate()).
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding _lock

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None and self.path.suffix == ".gguf":  # only when the dependency is missing
            raise ConfigError(f"{self.path}: a GGUF file's tokenizer runs through llama.cpp, which is not installed: "
                              "pip install llama-cpp-python (or pass token ids)")
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
        with self._turn(), torch.inference_mode():
            batch = Batch.make([0], [len(token_ids)], None, self.device)
            return self.model(torch.tensor([token_ids], device=self.device), batch)[0]

    @contextmanager
    def _turn(self):
        """Hold the engine for one generation or logits() call. Another thread waits its turn; the same thread,
        with an earlier generation still open, gets an error instead of waiting for itself forever."""
        me = threading.get_ident()
        if self._owner == me:
            raise EngineBusyError("this engine is already generating in this thread: finish the earlier generate() "
                                  "or chat() iterator, or close() it, before starting another")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _check_ids(self, token_ids: list[int]) -> None:
        vocab = self.args.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def generate(self, prompt_or_messages: str | list[dict] | list[int], config: GenerationConfig | None = None,
                 **overrides) -> Iterator[Event]:
        """Events for a completion of a plain prompt (str), of token ids (list of int), or of a conversation
        (list of role/content dicts).

        One engine serves one generation at a time: iterators consumed in several threads take turns (each waits,
        at its first event, until the one before has ended), so every answer is the one it would be alone. In one
        thread, starting a second iteration while the first is still open raises EngineBusyError. To serve
        concurrent requests, use a batch scheduler."""
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
        eos = self.tokenizer.eos_ids if self.tokenizer else set(_as_ids(self.config.get("eos_token_id")))
        with self._turn():
            self.cancel.clear()  # a stop() meant for the generation before this one
            yield from generate_loop(self.model, self.tokenizer, eos, ids, cfg, max_context=self.max_context,
                                     in_think=in_think, cancel=self.cancel,
                                     prefill_chunk=self.prefill_chunk)

    def stop(self) -> None:
        """Ask a running generation to end after the current step: a token, or a chunk of the prompt (thread-safe)."""
        self.cancel.set()

    @property
    def eos_ids(self) -> set[int]:
        return self.tokenizer.eos_ids if self.tokenizer else set(_as_ids(self.config.get("eos_token_id")))

    def prompt_ids(self, prompt_or_messages: str | list[dict] | list[int]) -> tuple[list[int], bool]:
        """The token ids a request starts from (a plain prompt, token ids, or a conversation through the chat
        template) and whether they end inside an open <think> block, as generate() reads its argument."""
        if isinstance(prompt_or_messages, str):
            return self._tok().encode(prompt_or_messages), prompt_opens_think(prompt_or_messages)
        items = list(prompt_or_messages)
        if not items:
            raise ValueError("the prompt is empty")
        if all(isinstance(t, int) for t in items):
            self._check_ids(items)
            return items, False
        ids, text = self._tok().encode_chat(items)
        return ids, prompt_opens_think(text)


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, context: int | None = None, *, options: RunOptions | None = None,
         progress: Callable[[float], None] | None = None, **settings) -> Engine:
    """Load a model directory (HF config.json + safetensors + tokenizer.json) or a GGUF file (`x.gguf`, or any part
    of a split `x-00001-of-0000N.gguf`). No path (or "demo"): the built-in demo model.

    `options` (hybridmoe.RunOptions) holds every setting with its default; `device`, `dtype`, `context` and keyword
    `settings` (any RunOptions field) override it. The device defaults to "auto": the first CUDA GPU when there is
    one, else the CPU.

    With a CUDA device (or accelerator="cpu", which simulates the GPUs on the CPU) the routed experts stay on the
    host and run through the offload engine: `devices` pipeline stages, `expert_cache_slots` GPU slots per device
    (None: as many as fit; 0: no cache), router-predicted `prefetch` of the top (k + `prefetch_margin`) experts,
    and the host tier `experts_tier` ("mmap" or "pinned"). `cost_model` (offload.scheduler.CostModel) holds the
    machine's measured rates; the default is a conservative workstation's. `cpu_repack` (GGUF) gives CPU-served
    experts a lane-interleaved copy that decodes faster; it sums in another order, so results then match within
    kernel tolerance.
    `cpu_activations` (GGUF): "int8-all" (the default) rounds the inputs of every quantized matrix computed on the
    CPU (routed experts, attention, dense layers, output head) to 8 bits per group of 32, as llama.cpp does:
    several times less compute, all CPU experts of a layer in one call per decode step, read in place on the mmap
    tier (Q2_K to Q6_K, Q8_0, IQ4_XS; layers of other types get the repacked copy); perplexity stays within 1 % of
    exact (bench/RESULTS.md). "int8" rounds only the routed experts' inputs; "f32" is exact.
    `cuda_graphs` replays each layer's non-expert work at decode as a captured CUDA graph (much less host time per
    token; attention then spans a masked window of keys, so results match eager decode within bf16 rounding).
    `cpu_threads` sets the threads of the CPU kernels and of torch (for the whole process).
    `gpu_weights` (GGUF on CUDA): "dequantized" copies of the non-expert weights in `dtype`, or "quantized": the
    file's blocks, read by hybridmoe's GEMV kernels at decode (about half the bytes and VRAM at Q8_0).
    `memory_budget` (GGUF on the CPU): bytes the process may hold, page cache included (None: the memory cgroup's
    limit or the RAM available). Routed experts beyond it are read from disk ahead of need, the most used ones kept
    in RAM (offload.disk); `prefetch` and `prefetch_margin` then steer the reads of predicted experts.
    `progress(fraction)`, if given, is called as the weights are read (a server's health check reports it)."""
    given = {k: v for k, v in (("device", device), ("dtype", dtype), ("context", context)) if v is not None}
    if isinstance(given.get("device"), torch.device):
        given["device"] = str(given["device"])
    try:
        opts = (options or RunOptions()).updated(**given, **settings)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return _load(model_path(path), opts, progress)


def _load(path: Path, opts: RunOptions, progress: Callable[[float], None] | None = None) -> Engine:
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    # --accelerator cpu: the CPU stands in for the GPUs, so "auto" does not go looking for one
    dev = torch.device("cpu") if opts.device == "auto" and opts.accelerator == Accelerator.CPU \
        else resolve_device(opts.device)
    dt = resolve_dtype(opts.dtype, dev)
    gguf = path.suffix == ".gguf"
    chunk = PREFILL_CHUNK
    if opts.cpu_threads is not None:
        from ..kernels.cpu import set_threads
        set_threads(opts.cpu_threads)
        torch.set_num_threads(opts.cpu_threads)
    accelerator = opts.accelerator
    if accelerator is None and dev.type == "cuda":
        accelerator = Accelerator.CUDA
    if accelerator is None:
        if opts.devices != 1 or opts.expert_cache_slots is not None:
            raise ConfigError("--devices and --expert-cache-slots need --device cuda or --accelerator cpu")
        loaded = _load_gguf(path, dev, dt, opts, progress=progress) if gguf else load_hf(path, dev, dt,
                                                                                        progress=progress)
        if gguf and dev.type == "cpu":  # experts beyond the memory budget are read from disk ahead of need
            attach_disk_tier(loaded.model, loaded.model.experts, opts.memory_budget, opts.prefetch,
                             opts.prefetch_margin)
    else:
        opts = opts.updated(accelerator=accelerator)
        devices = opts.devices
        if accelerator == Accelerator.CUDA and dev.type != "cuda":
            raise ConfigError("--accelerator cuda needs --device cuda")
        if accelerator == Accelerator.CUDA and devices > torch.cuda.device_count():
            raise ConfigError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) visible")
        stage_devs = stage_devices(opts)
        source = GGUFFile(path) if gguf else path
        fp = footprint_from_config(hf_config(source) if gguf else read_config(path), kv_bytes=dt.itemsize)
        stages = split_stages(list(fp.layer_bytes), devices)  # contiguous stages balanced by bytes
        layer_devs = [stage_devs[s] for s in stages]
        if gguf:
            loaded = _load_gguf(source, stage_devs[0], dt, opts, layer_devs, offloaded=True, progress=progress)
        else:
            loaded = load_hf(path, stage_devs[0], dt, layer_devs, experts_device="cpu", progress=progress)
        model = loaded.model
        ctx = opts.context or 4096
        kv = [ctx * opts.sequences * sum(b for b, st in zip(fp.kv_bytes_per_token, stages) if st == s)
              for s in range(devices)]
        model.experts = OffloadRuntime(model, make_store(model.experts, opts), opts, stages, kv, opts.cost_model,
                                       context=ctx)
        chunk = model.experts.prefill_chunk
        dev = stage_devs[0]
    if dev.type == "cuda":
        stack_qkv_projections(loaded.model)  # fewer launches per decode step
    if opts.cuda_graphs and dev.type == "cuda":
        loaded.model.decode_graphs = DecodeGraphs(loaded.model)
    tokenizer = getattr(loaded, "tokenizer", None)
    if not gguf and (path / "tokenizer.json").exists():
        tokenizer = Tokenizer(path, loaded.config)
    return Engine(loaded, tokenizer, path, dev, dt, opts.context, chunk)


# --- GGUF files (llama.cpp's format): non-expert weights dequantized, routed experts computed from their bytes ---
def _load_gguf(path, dev: torch.device, dt: torch.dtype, opts: RunOptions,
               layer_devices: list[torch.device] | None = None, offloaded: bool = False,
               progress: Callable[[float], None] | None = None) -> LoadedModel:
    # offloaded: the experts go on to the offload engine's store, so here they are only carried, not repacked
    from ..models.gguf_loader import load_gguf
    from ..offload.quant_experts import QuantExperts
    from .gguf_tokenizer import GGUFTokenizer, llama_cpp_available

    experts_acts, linear_acts = activation_modes(opts.cpu_activations)
    source = path if isinstance(path, GGUFFile) else GGUFFile(path)
    loaded, experts = load_gguf(source, dev, dt, layer_devices, linear_acts,
                                gpu_blocks=opts.gpu_weights == GpuWeights.QUANTIZED, progress=progress)
    # "pinned" (experts copied into RAM) is, for CPU-computed experts, the kernels' packed layout
    packed = not offloaded and opts.experts_tier == Tier.PINNED
    loaded.model.experts = QuantExperts(experts, tier="packed" if packed else "mmap",
                                        activations="f32" if offloaded else experts_acts)
    # Without llama-cpp-python the model still scores token ids; text needs its tokenizer.
    file = source.path
    loaded.tokenizer = GGUFTokenizer(file, loaded.config.get("chat_template"), source) \
        if llama_cpp_available() else None
    return loaded
# --- end GGUF ---