"""Where one decode step's time goes, per MoE layer: the step's wall time, the GPU's kernel and copy time (from
torch.profiler), the CPU experts' time inside the host nodes (their time-stamp counters), the gap between one
layer's node ending and the next one's starting (the GPU's work for a layer, the copies, waking the driver's thread),
and the same CPU work run alone from Python after a pause; what is left is the fixed cost per layer.

    python bench/decode_timeline.py MODEL.gguf [--slots 0] [--tokens 64] [--load '{"cpu_activations": "int8"}']

Decode feeds random token ids (as llama-bench does), hybridmoe with its default settings plus --load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import watch  # noqa: E402
import hybridmoe  # noqa: E402
from hybridmoe.engine.bench import _Counters, run_stream  # noqa: E402


def cpu_kernel_ms(experts, layers: list[int], reps: int) -> float | None:
    """Median ms of one decode step's CPU experts per layer, run alone on the host (the host nodes' task blocks,
    with the inputs of the last step), or None where the layers have no host node."""
    blocks = nodes_of(experts, layers)
    if not blocks:
        return None
    from hybridmoe.kernels.cpu import host_task
    time.sleep(0.5)  # the driver thread's OpenMP team stops spinning
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for node in blocks:
            host_task.run(node.block)
        times.append((time.perf_counter() - t0) / len(blocks))
    return 1e3 * statistics.median(times)


def nodes_of(experts, layers: list[int]) -> list:
    nodes = getattr(experts, "cpu_nodes", {})
    return [nodes[layer] for layer in layers if nodes.get(layer) is not None]


class Seen(_Counters):
    """The bench's counters plus the CPU experts' time the steps' stats report (the host nodes' own clocks)."""

    def __init__(self):
        super().__init__()
        self.cpu_s, self.steps = 0.0, 0

    def add(self, extra: dict) -> None:
        super().add(extra)
        self.cpu_s += extra.get("cpu_expert_s", 0.0)
        self.steps += 1


def gap_us(nodes: list, rate: float) -> float:
    """The median gap in us from one layer's node ending to the next one's starting, in the last step."""
    from hybridmoe.kernels.cpu import host_task as ht
    gaps = [(int(b.block[ht.STARTED]) - int(a.block[ht.ENDED])) / rate * 1e6 for a, b in zip(nodes, nodes[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots per GPU (default: the plan's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--load", default="{}", help="extra hybridmoe.load() options as JSON")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hand-over", choices=("pool", "host"), default="pool",
                    help="how the graph hands a layer to the CPU: the spinning pool (default) or host nodes")
    a = ap.parse_args()
    watch.arm()
    if a.threads:
        torch.set_num_threads(a.threads)
        from hybridmoe.kernels.cpu import set_threads
        set_threads(a.threads)
    from hybridmoe.offload import host_node
    host_node.HAND_OVER = a.hand_over
    watch.phase(f"loading {a.model}")
    eng = hybridmoe.load(a.model, device="cuda", context=1024, expert_cache_slots=a.slots, **json.loads(a.load))
    watch.phase("loaded; warm-up")
    model = eng.model
    vocab = model.tok_embeddings.weight.shape[0]
    stream = torch.randint(8, vocab, (a.tokens + 1,), generator=torch.Generator().manual_seed(1)).tolist()
    run_stream(eng, stream, _Counters())  # warm-up: graphs captured, pages read
    counters = Seen()
    experts = getattr(model.experts, "experts", model.experts)
    nodes = nodes_of(experts, model.moe_layers())
    watch.phase("timed steps")
    rates = [run_stream(eng, stream, counters) for _ in range(3)]
    from hybridmoe.kernels.cpu import host_task as ht
    in_node = (counters.cpu_s / max(1, counters.steps) / len(model.moe_layers()) * 1e6,
               gap_us(nodes, ht.cycles_per_second())) if nodes else None
    step_ms = 1e3 / max(rates)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_stream(eng, stream, _Counters())
    kernels = copies = 0.0
    n_kernels = 0
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if not t or e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "Memcpy" in e.key or "Memset" in e.key:
            copies += t
        else:
            kernels += t
            n_kernels += e.count
    steps = len(stream)
    moe = model.moe_layers()
    layers = len(model.layers)
    cpu_ms = cpu_kernel_ms(experts, moe, 20)
    gpu_ms, copy_ms = kernels / 1e3 / steps, copies / 1e3 / steps
    graphs = model.decode_graphs
    print(f"\n{Path(a.model).name}: {layers} layers ({len(moe)} MoE), {torch.cuda.get_device_name()}, "
          f"slots {a.slots}, hit rate {counters.hit_rate() or 0:.2f}, graphs "
          f"{'off' if graphs is None else f'{len(graphs.spans())} spans, enabled {graphs.enabled}'}")
    print(f"decode {1e3 / step_ms:.1f} tok/s (best of {len(rates)}): {step_ms:.2f} ms per step; "
          f"{n_kernels / steps:.0f} kernels per step")
    print(f"{'per MoE layer (us)':<20}{'step':>8}{'GPU kernels':>13}{'copies':>8}{'CPU in node':>13}"
          f"{'gap':>8}{'CPU alone':>11}{'rest':>8}")
    per = 1e3 / len(moe)
    inside, gap = in_node if in_node else (float("nan"), float("nan"))
    alone = cpu_ms * 1e3 if cpu_ms is not None else float("nan")
    rest = step_ms * per - gpu_ms * per - (inside if in_node else 0.0)
    print(f"{'':<20}{step_ms * per:>8.0f}{gpu_ms * per:>13.0f}{copy_ms * per:>8.0f}{inside:>13.0f}{gap:>8.0f}"
          f"{alone:>11.0f}{rest:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
