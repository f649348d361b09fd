"""Run options: every setting of load(), the offload engine and the runtime, with its default, in one place.

The command line builds them from its flags, a hardware profile from its [plan] section (which `hybridmoe tune`
writes), a program from keywords; they are validated once, here, and load() takes them as they are. When several
sources set one option the most specific wins: an explicit flag, then the profile, then the default below.
This module imports neither torch nor any other part of hybridmoe but its errors, so anything may import it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_NAME = "demo"  # the name that stands for the built-in model wherever a model is asked for


def model_path(spec: str | Path | None) -> Path:
    """A command's MODEL: a path, or `demo` / nothing for the built-in demo model (./demo is a path)."""
    if spec is None or str(spec) == DEMO_NAME:
        return DEMO_MODEL
    return Path(spec)


class Tier(StrEnum):
    """Where the routed experts live on the host."""
    MMAP = "mmap"  # the page cache over the model file
    PINNED = "pinned"  # copied once into pinned RAM (for the CPU: the kernels' packed layout)


class Accelerator(StrEnum):
    """What runs the offload engine's GPU side."""
    CUDA = "cuda"
    CPU = "cpu"  # the CPU stands in for the GPUs (how CI tests the offload engine)


class CpuActivations(StrEnum):
    """Activations of the GGUF kernels on the CPU."""
    F32 = "f32"  # exact
    INT8 = "int8"  # the routed experts' inputs rounded to 8 bits per group of 32, as llama.cpp does
    INT8_ALL = "int8-all"  # every quantized matrix's inputs (attention, dense layers, output head too): fastest,
    # perplexity within 1 % of exact (tested), llama.cpp's rounding; the default


class GpuWeights(StrEnum):
    """How a GGUF's non-expert weights live on a GPU."""
    DEQUANTIZED = "dequantized"  # copies in the model dtype (bfloat16), multiplied by the vendor's kernels
    QUANTIZED = "quantized"  # the file's blocks, read by our GEMV kernels: about half the bytes and VRAM at Q8_0


DTYPES = ("float32", "f32", "bfloat16", "bf16", "float16", "f16")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# The flag that sets each option, for messages (options without a flag are named as the API spells them).
FLAGS = {"device": "--device", "dtype": "--dtype", "context": "--ctx", "accelerator": "--accelerator",
         "devices": "--devices", "expert_cache_slots": "--expert-cache-slots", "prefetch": "--no-prefetch",
         "experts_tier": "--experts-tier", "cpu_activations": "--cpu-activations", "cuda_graphs": "--no-cuda-graphs",
         "gpu_weights": "--gpu-weights", "memory_budget": "--memory-budget"}


def _enum(cls: type[StrEnum], value, name: str):
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{FLAGS.get(name, name)} {value!r}: use one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a model is loaded and run. None means "decided at load time" as each comment says."""
    device: str = "auto"  # auto (the first CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU
    context: int | None = None  # tokens; None: min(4096, the model's)
    accelerator: Accelerator | None = None  # None: cuda on a CUDA device, else no offload engine
    devices: int = 1  # pipeline stages (GPUs, or simulated ones)
    expert_cache_slots: int | None = None  # per device; None: as many as fit; 0: no cache
    prefetch: bool = True
    prefetch_margin: int = 2  # experts predicted beyond top-k
    experts_tier: Tier = Tier.MMAP
    cpu_activations: CpuActivations = CpuActivations.INT8_ALL
    cpu_repack: bool = False  # GGUF experts on the CPU: lane-interleaved copies (faster, not bit-identical)
    gpu_weights: GpuWeights = GpuWeights.DEQUANTIZED
    cuda_graphs: bool = True
    cpu_threads: int | None = None  # threads of the CPU kernels and torch; None: leave them as they are
    cost_model: Any = None  # offload.scheduler.CostModel with the machine's rates; None: a default workstation's
    sequences: int = 1  # sequences decoded together (serve --max-seqs): the KV cache kept free when sizing the cache
    # bytes the process may hold, page cache included (GGUF on the CPU: experts beyond it are read from disk ahead of
    # need, offload.disk); None: the memory cgroup's limit or the RAM available
    memory_budget: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: the coerced enums are stored once, here
        set_(self, "device", str(self.device))
        set_(self, "accelerator", _enum(Accelerator, self.accelerator, "accelerator"))
        set_(self, "experts_tier", _enum(Tier, self.experts_tier, "experts_tier"))
        set_(self, "cpu_activations", _enum(CpuActivations, self.cpu_activations, "cpu_activations"))
        set_(self, "gpu_weights", _enum(GpuWeights, self.gpu_weights, "gpu_weights"))
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        # a torch.dtype passes too (the Python API takes one); its module is checked, not imported
        if self.dtype is not None and (self.dtype not in DTYPES if isinstance(self.dtype, str)
                                       else type(self.dtype).__module__ != "torch"):
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        for name, low in (("context", 1), ("devices", 1), ("expert_cache_slots", 0), ("prefetch_margin", 0),
                          ("cpu_threads", 1), ("sequences", 1), ("memory_budget", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{FLAGS.get(name, name)} {value!r}: expected a whole number")
            if value < low:
                raise ConfigError(f"{FLAGS.get(name, name)} {value}: must be at least {low}")
        if self.devices > 16:
            raise ConfigError(f"--devices {self.devices}: at most 16")

    @property
    def offloaded(self) -> bool | None:
        """Whether the offload engine runs: True, False, or None while it depends on what `auto` finds."""
        if self.accelerator is not None or self.device.startswith("cuda"):
            return True
        return None if self.device == "auto" else False

    def updated(self, **changes) -> "RunOptions":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    @classmethod
    def merged(cls, explicit: dict | None = None, profile: dict | None = None,
               gpu_available: bool | None = None) -> "RunOptions":
        """Precedence in one place: `explicit` (flags or keywords the user gave) over `profile` (a profile's
        values) over the defaults. A profile's per-GPU choices (devices, expert cache slots) apply only where the
        offload engine runs (gpu_available: whether device "auto" finds a GPU)."""
        explicit, profile = dict(explicit or {}), dict(profile or {})
        run = cls().updated(**(profile | explicit))
        offloaded = run.offloaded if run.offloaded is not None else bool(gpu_available)
        if not offloaded:
            for name in OFFLOAD_ONLY:
                if name in profile and name not in explicit:
                    run = run.updated(**{name: getattr(cls(), name)})
        return run


OFFLOAD_ONLY = ("devices", "expert_cache_slots")
