"""The batch runner over a GGUF file's experts: rows decoded together give the greedy tokens of the plain CPU engine
(tested against llama.cpp elsewhere), with the experts in the CPU kernels, or offloaded to the CPU standing in for
a GPU (part of them cached, prefill streamed as CUDA runs it, the CPU taking a share)."""
import pytest

import hybridmoe
from hybridmoe.engine.batch import BatchEngine
from hybridmoe.engine.scheduler import SchedulerConfig
from hybridmoe.offload.scheduler import CostModel

PROMPTS = [list(range(30, 52)), [7, 8, 9], list(range(100, 117)), [40, 41, 42, 43, 44, 45]]
SPLIT = CostModel(cpu_bytes_per_s=1e9, cpu_flops=2e10, h2d_bytes_per_s=1e9)  # the CPU takes a share of the copies


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("offload", ["cpu-kernels", "slots", "streamed"])
def test_batched_greedy_tokens_equal_the_plain_engine_alone(gguf_models, monkeypatch, family, offload):
    _, path = gguf_models(family, "q4_k_m")
    ref = hybridmoe.load(path, cpu_activations="f32")  # exact: the stand-in's cache slots take x unrounded
    alone = [list(ref.generate(p, temperature=0, max_tokens=10, ignore_eos=True))[-1].token_ids for p in PROMPTS]
    engine = ref if offload == "cpu-kernels" else hybridmoe.load(path, accelerator="cpu", expert_cache_slots=3,
                                                                   cost_model=SPLIT, cpu_activations="f32")
    streamed = []
    if offload == "streamed":  # the flag that makes CUDA's prefill grouped and streamed (offload.stream)
        experts = engine.model.experts.experts
        for dev in experts.stages:
            dev.grouped_prefill = True
        start = experts._start_streamed
        monkeypatch.setattr(experts, "_start_streamed", lambda *a: streamed.append(a[3].shape[0]) or start(*a))
    with BatchEngine(engine, SchedulerConfig(max_seqs=4, prefill_tokens=24)) as be:
        reqs = [be.submit(p, hybridmoe.GenerationConfig(temperature=0, max_tokens=10, ignore_eos=True))
                for p in PROMPTS]
        together = [list(r.events())[-1] for r in reqs]
    assert [d.token_ids for d in together] == alone
    assert be.metrics.decode_rows > be.metrics.decode_steps  # rows were decoded together
    if offload != "cpu-kernels":
        assert be.metrics.bytes_copied > 0 and be.metrics.cache_hits > 0
    if offload == "streamed":  # prompt chunks and multi-row decode steps both streamed
        assert max(streamed) > 4 and 2 in streamed


def graph_batch(path, slots: int, graphs: bool, items, cfgs):
    """The batch runner's tokens, 3 rows at once, with the decode graphs (uncaptured) or without; -> (tokens, the
    cache slots of the rows that ran as graphs, the runner, the engine)."""
    from hybridmoe.models.graphs import DecodeGraphs
    engine = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=slots, cpu_activations="int8",
                            cost_model=CostModel(h2d_bytes_per_s=1e3))
    ran = []
    if graphs:
        g = engine.model.decode_graphs = DecodeGraphs(engine.model, capture=False)
        run = g.run
        g.run = lambda tokens, batch, cache: ran.append(batch.slots[0]) or run(tokens, batch, cache)
    with BatchEngine(engine, SchedulerConfig(max_seqs=3, prefill_tokens=24)) as be:
        reqs = [be.submit(p, c) for p, c in zip(items, cfgs)]
        return [list(r.events())[-1] for r in reqs], ran, be, engine


@pytest.mark.parametrize("slots", [0, 6])
def test_graph_run_single_rows_between_batched_steps(gguf_models, slots):
    """8-bit CPU activations, copies never paying off: a step with one row left runs as the decode graphs run it
    (uncaptured here: the CPU's experts in host nodes, a slot table on the device for the cached ones), at whatever
    cache slot the row holds in the runner's own cache; steps of several rows and prompt chunks run host-placed in
    between, and their cache admissions must reach the slot tables. Without a cache every row gets the plain
    engine's tokens with the same activations. With one, where an expert runs changes its rounding (the stand-in's
    slots take x unrounded), so the reference is the same batch on the host-placed path alone: the same admissions
    at the same steps, so the same tokens bit for bit."""
    _, path = gguf_models("deepseek_v3", "q4_k_m")
    items = PROMPTS + [[5, 6]]
    cfgs = [hybridmoe.GenerationConfig(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 12, 6, 9, 14)]
    got, ran, be, engine = graph_batch(path, slots, True, items, cfgs)
    assert all(d.reason == "length" for d in got), [d.reason for d in got]
    if slots == 0:
        ref = hybridmoe.load(path, cpu_activations="int8")
        want = [list(ref.generate(p, c))[-1].token_ids for p, c in zip(items, cfgs)]
    else:
        want = [d.token_ids for d in graph_batch(path, slots, False, items, cfgs)[0]]
        assert be.metrics.cache_hits > 0
    assert [d.token_ids for d in got] == want
    assert be.metrics.decode_rows > be.metrics.decode_steps and ran and any(s != 0 for s in ran)
    nodes = engine.model.experts.experts.cpu_nodes
    assert all(n is not None and n.runs > 0 for n in nodes.values())
