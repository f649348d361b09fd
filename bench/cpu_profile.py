"""Where one CPU decode step (or one prefill) goes, by component: each module kind's time (its own, children
excluded) and how much of it is spent inside the numba kernels, for a GGUF file run on the CPU with the engine's
default settings.

    python bench/cpu_profile.py MODEL.gguf [--steps 64] [--prompt 128] [--threads 2] [--cpu-activations f32]
                                           [--prefill]

Components: a decoder block's attention half and a MoE layer where each runs as one kernel call (the default at
decode with 8-bit activations: kernels.cpu.AttentionHalf, MoEBlock; their parts are not split), else attention
projections (quantized linears of the attention), attention core (MLA or GQA between them),
router, routed experts, shared expert and dense MLPs, norms, output head, embedding, sampling (greedy argmax), and
the rest of the step (Python and torch glue outside all of these). The timers add about a microsecond per wrapped
call; the step time without them is printed too. Kernel time is the time inside numba-compiled calls; the goal of the
CPU-only issue is that it is >= 90% of a step. With --prefill the prompt itself is profiled (--steps prefills of
--prompt tokens, last token's logits only), and the routed experts' own time splits further: expert sort (which rows
go to which expert), expert combine (the weighted sum over each token's experts), and the rest of the routed
experts' own time (gathering the rows per expert, scattering the results back, Python).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

ORDER = ("attention half (one call)", "MoE layer (one call)", "attention projections", "attention core", "router",
         "routed experts", "expert sort", "expert combine", "shared expert / dense MLP", "norms", "output head", "embedding", "sampling", "rest (Python, torch glue)")


class Timers:
    """Exclusive time per label (a call's time minus its labelled children's) and kernel time per label."""

    def __init__(self):
        self.own = defaultdict(float)
        self.kernel = defaultdict(float)
        self.stack: list[str] = []
        self.kernel_depth = 0

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            self.stack.append(label)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.stack.pop()
                self.own[label] += dt
                if self.stack:
                    self.own[self.stack[-1]] -= dt
        return timed

    def wrap_kernel(self, fn):
        def timed(*args, **kwargs):
            if self.kernel_depth:
                return fn(*args, **kwargs)
            self.kernel_depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.kernel_depth -= 1
                self.kernel[self.stack[-1] if self.stack else ORDER[-1]] += time.perf_counter() - t0
        return timed


def instrument(model, timers: Timers) -> None:
    """Wrap the model's modules by kind and every numba dispatcher the CPU kernel wrappers call."""
    import numba

    from hybridmoe.layers.mlp import MLP
    from hybridmoe.layers.norm import RMSNorm
    from hybridmoe.models.common import MoE
    attention_types = tuple(type(b.attn) for b in model.layers)
    for name, m in model.named_modules():
        if isinstance(m, attention_types):
            m.forward = timers.wrap("attention core", m.forward)
            for child_name, child in m.named_children():
                if not isinstance(child, RMSNorm) and hasattr(child, "forward"):
                    child.forward = timers.wrap("attention projections", child.forward)
        elif isinstance(m, RMSNorm):
            m.forward = timers.wrap("norms", m.forward)
            m.add = timers.wrap("norms", m.add)
        elif isinstance(m, MLP):
            m.forward = timers.wrap("shared expert / dense MLP", m.forward)
        elif isinstance(m, MoE):
            m.route = timers.wrap("router", m.route)
    from hybridmoe.kernels import cpu as ck  # the decode blocks: each one kernel call for several of the above
    ck.AttentionHalf.__call__ = timers.wrap("attention half (one call)", ck.AttentionHalf.__call__)
    ck.MoEBlock.__call__ = timers.wrap("MoE layer (one call)", ck.MoEBlock.__call__)
    model.output.forward = timers.wrap("output head", model.output.forward)
    model.tok_embeddings.forward = timers.wrap("embedding", model.tok_embeddings.forward)
    experts = model.experts

    class TimedExperts:
        def __init__(self):
            self.call = timers.wrap("routed experts", experts.__call__)

        def __call__(self, *args):
            return self.call(*args)

        def start(self, *args):  # the layers' experts here are host-placed: start computes them at once
            out = self.call(*args)
            return lambda: out

        def __getattr__(self, name):
            return getattr(experts, name)

    model.experts = TimedExperts()
    from hybridmoe.layers import moe  # run_experts looks these up in its module at each call
    moe.expert_positions = timers.wrap("expert sort", moe.expert_positions)
    moe.combine = timers.wrap("expert combine", moe.combine)
    # every call of a numba-compiled function from Python (calls between jitted functions do not pass here)
    dispatcher = numba.core.registry.CPUDispatcher
    dispatcher.__call__ = timers.wrap_kernel(dispatcher.__call__)

def decode_steps(model, ids: list[int], n: int, sample, on_decode=lambda: None) -> float:
    """Prefill ids, then n greedy decode steps; the decode time per step in seconds. on_decode() is called between
    the two."""
    from hybridmoe.layers.cache import Batch
    cache = model.new_cache(1, len(ids) + n + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache, last_only=True)
        tok = sample(logits[0])
        on_decode()
        t0 = time.perf_counter()
        for step in range(n):
            logits = model(torch.tensor([[tok]]), Batch.make([len(ids) + step], [1], [0], "cpu"), cache,
                           last_only=True)
            tok = sample(logits[0])
    return (time.perf_counter() - t0) / n


def prefills(model, ids: list[int], n: int, sample, on_start=lambda: None) -> float:
    """n prefills of ids (each into a new cache, the last token's logits); the time per prefill in seconds."""
    from hybridmoe.layers.cache import Batch
    with torch.inference_mode():
        on_start()
        total = 0.0
        for _ in range(n):
            cache = model.new_cache(1, len(ids) + 1)
            t0 = time.perf_counter()
            sample(model(torch.tensor([ids]), Batch.make([0], [len(ids)], [0], "cpu"), cache, last_only=True)[0])
            total += time.perf_counter() - t0
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-activations", default=None, help="default: the engine's default")
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill (--steps of them), not "
                    "decode steps")
    a = ap.parse_args()
    import hybridmoe
    from hybridmoe.kernels.cpu import set_threads
    torch.set_num_threads(a.threads)
    set_threads(a.threads)
    kw = {} if a.cpu_activations is None else {"cpu_activations": a.cpu_activations}
    model = hybridmoe.load(a.model, **kw).model
    vocab = model.tok_embeddings.weight.shape[0]
    ids = np.random.default_rng(1).integers(8, vocab, a.prompt).tolist()
    timers = Timers()
    argmax = lambda logits: int(logits.argmax())  # noqa: E731
    if a.prefill:
        run = lambda sample, on_start=lambda: None: prefills(model, ids, a.steps, sample, on_start)  # noqa: E731
    else:
        run = lambda sample, on_start=lambda: None: decode_steps(model, ids, a.steps, sample, on_start)  # noqa: E731
    decode_steps(model, ids, 4, argmax)  # compile and page in
    plain = min(run(argmax) for _ in range(2))
    instrument(model, timers)
    sample = timers.wrap("sampling", argmax)

    def reset():
        timers.own.clear()
        timers.kernel.clear()
    step = run(sample, reset)
    own, kernel = dict(timers.own), dict(timers.kernel)
    own[ORDER[-1]] = own.get(ORDER[-1], 0.0) + step * a.steps - sum(own.values())
    per = 1000.0 / a.steps
    what = f"{a.steps} prefills of {a.prompt} tokens" if a.prefill else \
        f"{a.steps} decode steps after a {a.prompt}-token prompt"
    print(f"{a.model.name}: {what}, {a.threads} threads, cpu_activations {a.cpu_activations or 'default'}")
    rate = a.prompt / plain if a.prefill else 1 / plain
    print(f"step {1000 * plain:.2f} ms without timers ({rate:.1f} tok/s), {1000 * step:.2f} ms with them\n")
    print(f"| component | ms per {'prefill' if a.prefill else 'token'} | of which kernels | share of step |")
    print("|---|---|---|---|")
    for name in ORDER:
        t, k = own.get(name, 0.0), kernel.get(name, 0.0)
        if t or k:
            print(f"| {name} | {t * per:.3f} | {k * per:.3f} | {100 * t / (step * a.steps):.1f} % |")
    k_all = sum(kernel.values())
    print(f"| **step** | {step * 1000:.3f} | {k_all * per:.3f} | kernels {100 * k_all / (step * a.steps):.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
