"""`hybridmoe bench`: prompt processing (ppN) and token generation (tgN) speeds in the shape of llama-bench's
table, plus the expert cache's hit rate and the prefetcher's recall from the engine's Stats events.

As in llama-bench, both tests feed random token ids (no tokenizer needed): ppN reads a random prompt through the
generate loop (its prefill chunks), tgN decodes N random tokens one at a time from an empty context. Feeding the
model's own greedy output instead would measure a repetitive stream, on which expert caches and prefetching look
far better than on real text."""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from .config import GenerationConfig
from .events import Done, Error, Stats


@dataclass(slots=True)
class BenchOptions:
    n_prompt: tuple[int, ...] = (512,)  # ppN tests; 0 skips
    n_gen: tuple[int, ...] = (128,)  # tgN tests; 0 skips
    repetitions: int = 5
    warmup: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.repetitions < 1:
            raise ValueError("-r/--repetitions must be >= 1")
        if any(n < 0 for n in (*self.n_prompt, *self.n_gen)):
            raise ValueError("-p and -n must be >= 0")
        if not any(self.n_prompt) and not any(self.n_gen):
            raise ValueError("nothing to run: -p and -n are all 0")


@dataclass(slots=True)
class TestResult:
    model: str
    size_bytes: int
    params: int
    backend: str
    devices: int
    test: str  # "pp512" or "tg128"
    n_prompt: int
    n_gen: int
    samples: list[float] = field(default_factory=list)  # tokens/s of each repetition
    cache_hit_rate: float | None = None
    prefetch_recall: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def to_json(self) -> dict:
        return asdict(self) | {"t_s": self.mean, "t_s_std": self.std}


class _Counters:
    """Cache hits and misses and prefetch recall, summed over the Stats events of a run."""

    def __init__(self):
        self.hits = self.misses = 0
        self.rates: list[float] = []
        self.recalls: list[float] = []

    def add(self, extra: dict) -> None:
        if "cache_hits" in extra:
            self.hits += extra["cache_hits"]
            self.misses += extra.get("cache_misses", 0)
        elif "cache_hit_rate" in extra:
            self.rates.append(extra["cache_hit_rate"])
        if "prefetch_recall" in extra:
            self.recalls.append(extra["prefetch_recall"])

    def hit_rate(self) -> float | None:
        if self.hits + self.misses:
            return self.hits / (self.hits + self.misses)
        return statistics.fmean(self.rates) if self.rates else None

    def recall(self) -> float | None:
        return statistics.fmean(self.recalls) if self.recalls else None


def _prompt(engine, n: int, rng: random.Random) -> list[int]:
    """n token ids from the vocabulary, avoiding the special ids at the very start of it."""
    vocab = engine.args.vocab_size
    low = min(16, vocab - 1)
    return [rng.randrange(low, vocab) for _ in range(n)]


def run_once(engine, prompt: list[int], n_gen: int, counters: _Counters) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one generation. Decode speed is timed between the first and last decode
    Stats, so it counts only steps that ran the model (the first token comes from the prefill's logits)."""
    cfg = GenerationConfig(max_tokens=max(1, n_gen), temperature=0.0, ignore_eos=True)
    prefill, first, last = 0.0, None, None
    for ev in engine.generate(prompt, cfg):
        if isinstance(ev, Stats):
            counters.add(ev.extra)
            if ev.phase == "prefill":
                prefill = ev.prefill_tok_s
            else:
                first = first or ev
                last = ev
        elif isinstance(ev, Error):
            from ..errors import HybridMoEError
            raise HybridMoEError(ev.message)
        elif isinstance(ev, Done) and ev.reason not in ("length", "eos"):
            from ..errors import HybridMoEError
            raise HybridMoEError(f"generation stopped early ({ev.reason}) after {ev.completion_tokens} tokens")
    decode = 0.0
    if first is not None and last is not None and last.step > first.step:
        decode = (last.step - first.step) / max(1e-9, last.elapsed_s - first.elapsed_s)
    return prefill, decode


def run_stream(engine, tokens: list[int], counters: _Counters) -> float:
    """Decode tok/s of `tokens` fed one per step from an empty context, each step ending in a host sync on its
    logits as a sampler's does. The first token's step is not timed (it is a one-token prefill)."""
    import torch

    from ..layers.cache import Batch
    from .generate import expert_stats
    model, device = engine.model, engine.device
    cache = model.new_cache(1, min(engine.max_context, max(256, 1 << len(tokens).bit_length())))
    t0 = None
    with torch.inference_mode():
        for pos, token in enumerate(tokens):
            if pos == 1:
                t0 = time.perf_counter()
            logits = model(torch.tensor([[token]], device=device), Batch.make([pos], [1], [0], device), cache,
                           last_only=True)
            int(logits.argmax())  # host sync
            counters.add(expert_stats(model))
    return (len(tokens) - 1) / max(1e-9, time.perf_counter() - t0) if t0 is not None else 0.0


def describe(engine) -> dict:
    """The model and backend columns of the table."""
    from ..models.summary import summarize
    path = engine.path
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf")]
    try:
        params = summarize(engine.config)["params_total"]
    except Exception:  # a config summarize cannot read must not stop a benchmark
        params = sum(p.numel() for p in engine.model.parameters())
    from ..offload.runtime import OffloadRuntime
    runtime = engine.model.experts
    if isinstance(runtime, OffloadRuntime):
        opts = runtime.opts
        backend = "CUDA+CPU experts" if opts.accelerator == "cuda" else "CPU (offload, simulated GPUs)"
        devices = opts.devices
    else:
        backend, devices = ("CUDA" if engine.device.type == "cuda" else "CPU"), 1
    return {"model": f"{engine.model_type} {path.name}", "size_bytes": sum(f.stat().st_size for f in files),
            "params": int(params), "backend": backend, "devices": devices}


def run_bench(engine, opts: BenchOptions, progress=None) -> list[TestResult]:
    from ..errors import ContextOverflowError
    info = describe(engine)
    rng = random.Random(opts.seed)
    tests = [(n, 0) for n in opts.n_prompt if n] + [(0, n) for n in opts.n_gen if n]
    results = []
    for n_p, n_g in tests:
        need = max(n_p, 1) + max(n_g, 1) + 1
        if need > engine.max_context:
            raise ContextOverflowError(f"{'pp' if n_p else 'tg'}{n_p or n_g} needs a context of {need} tokens but "
                                       f"the engine's is {engine.max_context}; lower -p/-n, or raise --ctx if the "
                                       "model allows more")
        res = TestResult(**info, test=f"pp{n_p}" if n_p else f"tg{n_g}", n_prompt=n_p, n_gen=n_g)
        counters = _Counters()
        prompt = _prompt(engine, max(n_p, 1 + n_g), rng)
        if opts.warmup:  # the same work once: first calls at each sequence length pick and load kernels
            run_once(engine, prompt, 1, _Counters()) if n_p else run_stream(engine, prompt, _Counters())
        for r in range(opts.repetitions):
            got = run_once(engine, prompt, 1, counters)[0] if n_p else run_stream(engine, prompt, counters)
            res.samples.append(got)
            if progress:
                progress(f"{res.test}: repetition {r + 1}/{opts.repetitions}: {res.samples[-1]:.2f} tok/s")
        res.cache_hit_rate, res.prefetch_recall = counters.hit_rate(), counters.recall()
        results.append(res)
    return results


def _size(n: float) -> str:
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


def format_table(results: list[TestResult]) -> str:
    """A Markdown table like llama-bench's, with the cache hit rate and prefetch recall added."""
    head = ["model", "size", "params", "backend", "devices", "test", "t/s", "cache hit", "prefetch recall"]
    rows = []
    for r in results:
        pct = lambda v: "-" if v is None or math.isnan(v) else f"{100 * v:.1f}%"  # noqa: E731
        rows.append([r.model, _size(r.size_bytes), _count(r.params), r.backend, str(r.devices), r.test,
                     f"{r.mean:.2f} ± {r.std:.2f}", pct(r.cache_hit_rate), pct(r.prefetch_recall)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 4, 5, 6, 7, 8}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def to_json(results: list[TestResult]) -> str:
    return json.dumps([r.to_json() for r in results], indent=1)
