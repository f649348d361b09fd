"""The CPU decode blocks against the same layers called one by one, in one process, alternated, on the same random
token stream, at the default settings: decode tok/s of each, every round and the best. Modes: "plan" (the default:
models.cpu_step, the kernels below called with their arguments gathered once per model), "halves" (each decoder
block's attention half with its residual adds and norms in one call, kernels.cpu.AttentionHalf, and its MoE layer
in one call, MoEBlock, through the modules), "blocks" (the attention block alone in one call, MLABlock / GQABlock, the
norms by themselves), "layers" (every layer by itself).

    python bench/cpu_blocks_ab.py MODEL.gguf [--threads 2] [--rounds 4] [--tokens 64]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hybridmoe  # noqa: E402
from hybridmoe.engine.bench import _Counters, run_stream  # noqa: E402
from hybridmoe.kernels.cpu import set_threads  # noqa: E402
from hybridmoe.layers.attention import GQAttention  # noqa: E402
from hybridmoe.layers.mla import MLA  # noqa: E402
from hybridmoe.models.common import Block, MoE  # noqa: E402
from hybridmoe.models.cpu_step import CPUDecodePlan  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_threads(a.threads)
    eng = hybridmoe.load(a.model)
    rng = random.Random(0)
    stream = [rng.randrange(16, eng.args.vocab_size) for _ in range(a.tokens)]
    methods = {(cls, "cpu_block"): cls.cpu_block for cls in (GQAttention, MLA, MoE)}
    methods[Block, "cpu_half"] = Block.cpu_half
    methods[CPUDecodePlan, "of"] = CPUDecodePlan.of
    off = {GQAttention: lambda self: None, MLA: lambda self: None, MoE: lambda self, layer, experts: None,
           Block: lambda self: None, CPUDecodePlan: classmethod(lambda cls, model: None)}
    modes = {"plan": (), "halves": (CPUDecodePlan,), "blocks": (CPUDecodePlan, Block),
             "layers": (CPUDecodePlan, GQAttention, MLA, MoE, Block)}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(a.rounds):
        for name, offs in modes.items():
            for (cls, attr), fn in methods.items():
                setattr(cls, attr, off[cls] if cls in offs else fn)
            eng.model._cpu_plan = None
            run_stream(eng, stream[:8], _Counters())  # warm-up in this mode
            rates[name].append(max(run_stream(eng, stream, _Counters()) for _ in range(2)))
    for (cls, attr), fn in methods.items():
        setattr(cls, attr, fn)
    print(f"{Path(a.model).name}: {a.threads} threads, {a.rounds} alternated rounds of {a.tokens} random tokens")
    for name, got in rates.items():
        print(f"{name:>7}: best {max(got):7.2f} tok/s   rounds {' '.join(f'{r:.1f}' for r in got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
