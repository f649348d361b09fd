"""Hardware profiles: a machine (GPUs, RAM, cores, bandwidths), the cost model's constants, and the plan choices
that `hybridmoe tune` made for it, as a small TOML file. Reading is strict: an unknown section or key, a missing
one, or a value of the wrong type is a ConfigError that names the key and the file."""
from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from ..errors import ConfigError
from ..offload.plan import GPU, GiB, Hardware, PlanOptions
from ..offload.scheduler import CostModel

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FORMAT = 1
SOURCES = ("datasheet", "measured", "estimate")
PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"  # the profiles shipped in the source tree


@dataclass(slots=True)
class Meta:
    name: str
    source: str  # datasheet: spec-sheet figures; measured: `hybridmoe tune`; estimate: defaults or guesses
    format: int = FORMAT
    created: str = ""  # ISO date
    description: str = ""
    how: str = ""  # how the figures were obtained (command, machine, date)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"profile.source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.format != FORMAT:
            raise ValueError(f"profile.format {self.format}: this version reads format {FORMAT}")


@dataclass(slots=True)
class GPUSpec:
    name: str
    memory_gib: float
    free_gib: float | None = None  # None: memory_gib less what a CUDA context takes
    compute_capability: str = ""
    pcie_gen: int = 0
    pcie_width: int = 0

    def __post_init__(self):
        if self.memory_gib <= 0:
            raise ValueError("hardware.gpus.memory_gib must be > 0")
        if self.free_gib is not None and not 0 < self.free_gib <= self.memory_gib:
            raise ValueError("hardware.gpus.free_gib must be in (0, memory_gib]")

    def as_gpu(self) -> GPU:
        free = self.free_gib if self.free_gib is not None else self.memory_gib - 0.5
        return GPU(self.name, int(self.memory_gib * GiB), int(free * GiB))


@dataclass(slots=True)
class HardwareSpec:
    ram_total_gib: float
    ram_available_gib: float
    cpu_cores: int
    gpus: tuple[GPUSpec, ...] = ()
    cpu_model: str = ""
    cpu_threads: int = 0  # logical; 0: as cores
    numa_nodes: int = 1
    cpu_flags: tuple[str, ...] = ()
    disk_read_bytes_per_s: float = 2e9
    disk_free_gib: float = 0.0
    h2d_pageable_bytes_per_s: float = 0.0  # copies from unpinned (mmap'd) memory; 0: not measured

    def __post_init__(self):
        if not 0 < self.ram_available_gib <= self.ram_total_gib:
            raise ValueError("hardware.ram_available_gib must be in (0, ram_total_gib]")
        if self.cpu_cores < 1 or self.numa_nodes < 1:
            raise ValueError("hardware.cpu_cores and hardware.numa_nodes must be >= 1")
        if self.disk_read_bytes_per_s <= 0:
            raise ValueError("hardware.disk_read_bytes_per_s must be > 0")


@dataclass(slots=True)
class PlanSpec:
    """Choices for a run on this machine (tune fills them in for one model)."""
    model: str = ""
    context: int = 4096
    batch: int = 1
    devices: int = 0  # GPUs to use; 0: all
    expert_cache_slots: tuple[int, ...] = ()  # per GPU; (): as many as fit
    experts_tier: str = "auto"
    cpu_threads: int = 0  # 0: all cores
    prefetch_margin: int = 2
    predicted_tok_s: float = 0.0

    def __post_init__(self):
        if self.context < 1 or self.batch < 1:
            raise ValueError("plan.context and plan.batch must be >= 1")
        if self.experts_tier not in ("auto", "pinned", "mmap"):
            raise ValueError(f"plan.experts_tier {self.experts_tier!r}: use auto, pinned or mmap")
        if min((self.devices, self.cpu_threads, self.prefetch_margin, *self.expert_cache_slots), default=0) < 0:
            raise ValueError("plan.devices, cpu_threads, prefetch_margin and expert_cache_slots must be >= 0")


@dataclass(slots=True)
class EngineCosts:
    """What this engine's own code costs on the machine, beyond reading bytes: timed decode steps of small twins
    of a model family (hybridmoe.engine.calibrate), and the rates of the CPU kernels the engine's paths run.
    accelerator "": not measured (the tuner then falls back to launch counts and defaults)."""
    accelerator: str = ""  # "cuda", or "cpu" (the CPU standing in for the GPU)
    family: str = ""  # model_type of the twins timed (attention differs by family)
    step_s: float = 0.0  # per decode step: embedding, head, sampling, the generate loop, a dense layer if any
    moe_layer_s: float = 0.0  # per MoE layer with its experts in GPU slots: attention, router, host sync, launches
    cpu_expert_s: float = 0.0  # added per expert served on the CPU instead of from a slot (bytes not included)
    cpu_expert_bytes_per_s: float = 0.0  # CPU kernel over experts in the file's layout (offload host tier)
    cpu_layer_bytes_per_s: float = 0.0  # CPU kernel over quantized non-expert layers (accelerator cpu)
    threads: int = 0  # CPU threads of these measurements

    def __post_init__(self):
        if self.accelerator not in ("", "cuda", "cpu"):
            raise ValueError(f"engine.accelerator {self.accelerator!r}: use cuda or cpu")
        if min(self.step_s, self.moe_layer_s, self.cpu_expert_s, self.cpu_expert_bytes_per_s,
               self.cpu_layer_bytes_per_s, self.threads) < 0:
            raise ValueError("engine costs and rates must be >= 0")

    @property
    def measured(self) -> bool:
        return bool(self.accelerator)


@dataclass(slots=True)
class Profile:
    profile: Meta
    hardware: HardwareSpec
    cost: CostModel = field(default_factory=CostModel)
    plan: PlanSpec = field(default_factory=PlanSpec)
    engine: EngineCosts = field(default_factory=EngineCosts)

    def hardware_for_plan(self) -> Hardware:
        h = self.hardware
        return Hardware(tuple(g.as_gpu() for g in h.gpus), int(h.ram_total_gib * GiB),
                        int(h.ram_available_gib * GiB), h.cpu_cores, self.cost.h2d_bytes_per_s,
                        self.cost.cpu_bytes_per_s, h.disk_read_bytes_per_s, self.cost.gpu_flops)

    def plan_options(self) -> PlanOptions:
        p = self.plan
        return PlanOptions(context=p.context, batch=p.batch, experts_tier=p.experts_tier,
                           max_slots=max(p.expert_cache_slots) if p.expert_cache_slots else None,
                           prefetch_margin=p.prefetch_margin)


    def run_options(self) -> dict:
        """What this profile sets for a run (RunOptions fields): its [plan] as `hybridmoe tune` chose it, and its
        cost constants. The plan's batch is not among them: generation runs one sequence."""
        p = self.plan
        out = {"cost_model": self.cost, "context": p.context, "prefetch_margin": p.prefetch_margin}
        if p.experts_tier != "auto":
            out["experts_tier"] = p.experts_tier
        if p.cpu_threads:
            out["cpu_threads"] = p.cpu_threads
        if p.devices:
            out["devices"] = p.devices
        if p.expert_cache_slots:
            out["expert_cache_slots"] = min(p.expert_cache_slots)
        return out


SECTIONS = {f.name: f for f in fields(Profile)}


# --- reading ---------------------------------------------------------------------------------------------------
def _coerce(value, hint, key: str, path) -> object:
    """A TOML value as the annotated type, or a ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return _coerce(value, next(a for a in args if a is not type(None)), key, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: key '{key}' must be a list, got {_kind(value)}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]", path) for i, v in enumerate(value))
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: key '{key}' must be a table, got {_kind(value)}")
        return _build(hint, value, key, path)
    ok = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}[hint]
    if isinstance(value, bool) and hint is not bool or not isinstance(value, ok):
        raise ConfigError(f"{path}: key '{key}' must be {hint.__name__}, got {_kind(value)} {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{path}: key '{key}' must be a finite number, got {value!r}")
    return float(value) if hint is float else value


def _kind(value) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


def _build(cls, table: dict, section: str, path):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in table:
        if key not in names:
            raise ConfigError(f"{path}: unknown key '{section}.{key}' (known keys of [{section}]: "
                              f"{', '.join(names)})")
    kw = {}
    for f in fields(cls):
        if f.name in table:
            kw[f.name] = _coerce(table[f.name], hints[f.name], f"{section}.{f.name}", path)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path}: missing key '{section}.{f.name}'")
    try:
        return cls(**kw)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads(text: str, path: str | Path = "<profile>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown section or key '{unknown[0]}': not a hybridmoe profile (it has "
                          f"[{'], ['.join(SECTIONS)}])")
    for name in ("profile", "hardware"):
        if name not in data:
            raise ConfigError(f"{path}: missing section [{name}]: not a hybridmoe profile")
    hints = typing.get_type_hints(Profile)
    return Profile(**{k: _coerce(v, hints[k], k, path) for k, v in data.items()})


def load(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read profile ({e})") from None
    return loads(text, path)


# --- writing: TOML for the few types a profile holds -----------------------------------------------------------
def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        if v and (abs(v) >= 1e6 or abs(v) < 1e-3):  # rates and times: 87e9 reads as 87 GB/s, 2e-05 as 20 us
            exp = 3 * math.floor(math.log10(abs(v)) / 3)
            return f"{v / 10 ** exp:.6g}e{exp}"
        text = f"{v:.6g}"
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return '"' + "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in out) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(name: str, d: dict, comment: str = "") -> list[str]:
    lines = [f"# {comment}"] if comment else []
    lines.append(f"[{name}]")
    subs = {k: v for k, v in d.items() if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict)}
    lines += [f"{k} = {_value(v)}" for k, v in d.items() if k not in subs and v is not None]
    for k, items in subs.items():
        for item in items:
            lines += ["", f"[[{name}.{k}]]"] + [f"{ik} = {_value(iv)}" for ik, iv in item.items() if iv is not None]
    return lines + [""]


def dumps(profile: Profile, header: list[str] = (), comments: dict[str, str] | None = None) -> str:
    """TOML text; `header` lines and per-section `comments` become # comments."""
    comments = comments or {}
    lines = [f"# {h}" if h else "#" for h in header] + ([""] if header else [])
    for name in SECTIONS:
        lines += _table(name, asdict(getattr(profile, name)), comments.get(name, ""))
    return "\n".join(lines)


def save(profile: Profile, path: str | Path, header: list[str] = (), comments: dict[str, str] | None = None) -> Path:
    path = Path(path)
    text = dumps(profile, header, comments)
    loads(text, path)  # never write a file that would not load back
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..formats.atomic import staged
    with staged(path) as tmp:  # a failed write leaves an existing profile as it was
        tmp.write_text(text)
    return path


# --- finding ---------------------------------------------------------------------------------------------------
def available() -> dict[str, Path]:
    """Profiles shipped in profiles/, by name."""
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))} if PROFILES_DIR.is_dir() else {}


def find(spec: str) -> Path:
    """A profile by file path or by shipped name (e.g. rtx6000ada-x2)."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--profile {spec}: no such file")
        return path
    shipped = available()
    if spec not in shipped:
        raise ConfigError(f"--profile {spec!r}: no such file or shipped profile; shipped: "
                          f"{', '.join(shipped) or 'none'}, or 'auto'")
    return shipped[spec]


# --- from this machine ----------------------------------------------------------------------------------------
def spec_from_machine(m, disk_read_bytes_per_s: float | None = None) -> HardwareSpec:
    """A probe.Machine as the profile's [hardware] section."""
    gpus = tuple(GPUSpec(g.name, round(g.bytes_total / GiB, 2), round(min(g.bytes_free, g.bytes_total) / GiB, 2),
                         g.compute_capability, g.pcie_gen, g.pcie_width) for g in m.gpus)
    rate = (m.disk.read_bytes_per_s if m.disk and m.disk.read_bytes_per_s else None) or disk_read_bytes_per_s or 2e9
    return HardwareSpec(round(m.ram_total / GiB, 2), round(min(m.ram_available, m.ram_total) / GiB, 2), m.cpu.cores,
                        gpus, m.cpu.model, m.cpu.threads, m.cpu.numa_nodes, m.cpu.flags, rate,
                        round(m.disk.bytes_free / GiB, 1) if m.disk else 0.0)


def _gpu_key(name: str) -> str:
    return "".join(name.lower().replace("nvidia", "").replace("generation", "").split())


def matches(p: Profile, m) -> bool:
    """Same number of GPUs, the same models (by name) and sizes within 10%; or both without GPUs."""
    if len(p.hardware.gpus) != len(m.gpus):
        return False
    for spec, info in zip(p.hardware.gpus, m.gpus):
        a, b = _gpu_key(spec.name), _gpu_key(info.name)
        if not (a in b or b in a) or abs(spec.memory_gib * GiB - info.bytes_total) > 0.1 * info.bytes_total:
            return False
    return True


def matching(m) -> Profile | None:
    """The first shipped profile that describes machine `m`."""
    for path in available().values():
        p = load(path)
        if matches(p, m):
            return p
    return None


def auto(measure_s: float = 10.0, progress: bool = True) -> Profile:
    """This machine: its probed hardware with the cost constants of the shipped profile that matches it, else
    with quick measurements."""
    from datetime import date

    from . import microbench
    from .probe import probe_machine
    m = probe_machine()
    p = matching(m)
    if p is not None:
        p.profile.description = f"hardware probed; cost constants from {p.profile.name} ({p.profile.source})"
        p.hardware = spec_from_machine(m, p.hardware.disk_read_bytes_per_s)
        return p
    dtype = "bfloat16" if m.gpus else "float32"
    got = microbench.run(microbench.BenchSettings(dtype=dtype, budget_s=measure_s, progress=progress))
    return Profile(Meta("auto", "measured", created=date.today().isoformat(), description="probed, no shipped "
                        "profile matched", how=f"quick microbenchmarks ({measure_s:.0f} s) for --profile auto"),
                   spec_from_machine(m), got.cost_model())


def resolve(spec: str) -> Profile:
    """--profile: 'auto', a shipped profile's name, or a TOML file."""
    return auto() if spec == "auto" else load(find(spec))
