"""Streamed prefill (offload.stream) with the CPU standing in for the GPU: forced by the flag that makes CUDA's
prefill grouped (DeviceSlots.grouped_prefill), it must give the plain CPU engine's logits bit for bit, from either
host tier, with or without part of the experts cached, with the CPU taking a share or not, on one stage or two; and
it must copy each used uncached expert at most once per layer and chunk, and never a cached one."""
import pytest
import torch

import hybridmoe
from hybridmoe.offload.scheduler import CostModel

IDS = list(range(30, 60))
# copies always pay (the CPU takes nothing), or the CPU and the copies cost alike (the CPU takes a share)
COSTS = {"copy": CostModel(cpu_bytes_per_s=1e3, cpu_flops=1e3, h2d_bytes_per_s=1e15),
         "split": CostModel(cpu_bytes_per_s=1e9, cpu_flops=2e10, h2d_bytes_per_s=1e9)}


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def q4(request, gguf_models):
    _, path = gguf_models(request.param, "q4_k_m")
    ref = hybridmoe.load(path, cpu_activations="f32")  # exact: the stand-in GPU computes its experts in f32
    return path, ref.logits(IDS), list(ref.generate(IDS[:6], temperature=0, max_tokens=10,
                                                     ignore_eos=True))[-1].token_ids


def streamed(path, **kw):
    eng = hybridmoe.load(path, accelerator="cpu", **{"cpu_activations": "f32", **kw})
    experts = eng.model.experts.experts
    for dev in experts.stages:
        dev.grouped_prefill = True
    return eng, experts


def spy_layers(experts, monkeypatch) -> list[tuple[int, set[int], set[int], set[int]]]:
    """Record (layer, experts used, experts cached, experts held in staging) as each streamed layer starts."""
    seen = []
    start = experts._start_streamed

    def spy(dev, stream, layer, x, ids, weights):
        cached = {e for e in range(experts.store.n_experts[layer]) if dev.cache.lookup((layer, e)) is not None}
        seen.append((layer, set(ids.flatten().tolist()), cached, set(stream.held(layer))))
        return start(dev, stream, layer, x, ids, weights)

    monkeypatch.setattr(experts, "_start_streamed", spy)
    return seen


@pytest.mark.parametrize("tier", ["mmap", "pinned"])
@pytest.mark.parametrize("slots,devices,cost", [(0, 1, "copy"), (0, 1, "split"), (5, 1, "split"), (5, 2, "copy"),
                                                (3, 2, "split")])
def test_streamed_prefill_is_lossless(q4, monkeypatch, tier, slots, devices, cost):
    path, logits, tokens = q4
    eng, experts = streamed(path, expert_cache_slots=slots, devices=devices, experts_tier=tier,
                            cost_model=COSTS[cost])
    seen = spy_layers(experts, monkeypatch)
    assert torch.equal(eng.logits(IDS), logits)
    stats = eng.model.experts.take_stats()
    assert [s[0] for s in seen] == eng.model.moe_layers()  # every MoE layer streamed
    assert stats["bytes_copied"] > 0
    assert any(c["cpu"] for c in stats["layers"].values()) == (cost == "split")
    if cost == "split" and devices == 1:  # a layer copied ahead leaves the CPU its share of the next one
        assert all(c["cpu"] for c in stats["layers"].values())
    assert torch.equal(eng.logits(IDS), logits)  # again, now with experts cached (slots) or held in staging
    again = eng.model.experts.take_stats()
    if slots:
        assert again["cache_hits"] > 0
    eng.prefill_chunk = 4  # the prompt in chunks of 4 tokens, then decode
    assert list(eng.generate(IDS[:6], temperature=0, max_tokens=10, ignore_eos=True))[-1].token_ids == tokens


@pytest.mark.parametrize("slots", [0, 5])
def test_each_used_uncached_expert_crosses_once_per_layer_and_chunk(q4, monkeypatch, slots):
    path = q4[0]
    eng, experts = streamed(path, expert_cache_slots=slots, cost_model=COSTS["copy"])
    seen = spy_layers(experts, monkeypatch)
    copies: list[tuple[int, int, list[int]]] = []  # (index into seen when issued, layer, experts)
    store = experts.store
    copy_experts = store.copy_experts

    def spy(staging, row, layer, first, n, bounce=None):
        copies.append((len(seen), layer, list(range(first, first + n))))
        return copy_experts(staging, row, layer, first, n, bounce)

    monkeypatch.setattr(store, "copy_experts", spy)
    eng.prefill_chunk = 8
    list(eng.generate(IDS, temperature=0, max_tokens=2, ignore_eos=True))
    moe = eng.model.moe_layers()
    assert [s[0] for s in seen] == moe * 4  # 30 tokens in chunks of 8; decode steps do not stream
    for i, (layer, used, cached, held) in enumerate(seen):
        first = i - i % len(moe)  # the chunk's first layer
        # this layer's copies in this chunk: issued as the layer ran, or ahead of it by an earlier layer
        mine = [e for at, lay, es in copies if lay == layer and first < at <= i + 1 for e in es]
        assert len(mine) == len(set(mine)), f"layer {layer}: an expert crossed twice in one chunk"
        assert not set(mine) & cached, f"layer {layer}: a cached expert was copied"
        assert used <= set(mine) | cached | held, f"layer {layer}: a used expert never reached the GPU"


def test_without_the_flag_the_cpu_stand_in_keeps_the_per_expert_path(q4, monkeypatch):
    """The CPU standing in for a GPU streams only when told to (the tests' flag): its default stays the path whose
    per-expert calls the invariance tests pin."""
    eng = hybridmoe.load(q4[0], accelerator="cpu", expert_cache_slots=0, cpu_activations="f32")
    experts = eng.model.experts.experts
    assert experts.streams and not any(dev.grouped_prefill for dev in experts.stages)
    seen = spy_layers(experts, monkeypatch)
    assert torch.equal(eng.logits(IDS), q4[1])
    assert seen == []


@pytest.mark.parametrize("parallel", [True, False])
def test_two_gpus_stream_disjoint_shares_of_each_layer(q4, monkeypatch, parallel):
    """Two stages (the CPU standing in for two GPUs): with expert parallelism each stage's staging takes a share of
    every streamed layer's copies, disjoint from the other's, and computes it; the layer's own stage keeps its cache
    and sums nothing differently: the logits stay the plain engine's, bit for bit."""
    path, logits, _ = q4
    eng, experts = streamed(path, expert_cache_slots=0, devices=2, cost_model=COSTS["copy"])
    experts.expert_parallel = parallel
    loads = []
    for s, stream in experts.streams.items():
        load = stream.load
        monkeypatch.setattr(stream, "load", lambda layer, es, s=s, load=load: loads.append((s, layer, es))
                            or load(layer, es))
    assert sorted(experts.streams) == [0, 1]
    assert torch.equal(eng.logits(IDS), logits)
    for layer in eng.model.moe_layers():
        by_stage = {s: {e for t, lay, es in loads if t == s and lay == layer for e in es} for s in (0, 1)}
        own = experts.layer_stage[layer]
        assert by_stage[own], f"layer {layer}: its own GPU copied nothing"
        assert bool(by_stage[1 - own]) == parallel
        assert not by_stage[0] & by_stage[1]


@pytest.mark.parametrize("slots", [0, 5])
def test_streamed_prefill_in_bfloat16_takes_the_cpu_share(q4, slots):
    """The model in bfloat16 (CUDA's default dtype) with the CPU taking its few-token experts: the CPU computes in
    float32 and its rows join the device's bfloat16 parts; the plain CPU engine's logits in bfloat16 within its
    rounding."""
    path, _, _ = q4
    want = hybridmoe.load(path, dtype="bfloat16").logits(IDS).float()
    eng, experts = streamed(path, expert_cache_slots=slots, dtype="bfloat16", cost_model=COSTS["split"],
                            cpu_activations="int8-all")  # the default: the CPU reads the file's bytes
    got = eng.logits(IDS).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2.0**-4
    assert any(c["cpu"] for c in eng.model.experts.take_stats()["layers"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tier,slots", [("pinned", 0), ("mmap", 0), ("pinned", 5)])
@pytest.mark.parametrize("dtype", ["float32", None])
def test_cuda_streamed_prefill_agrees_with_the_cpu_run(q4, monkeypatch, tier, slots, dtype):
    """On a GPU, prefill streams every MoE layer (staging copies on the copy stream, bounce pieces for the mmap
    tier, grouped bf16 calls): the CPU engine's logits within bf16 kernel tolerance, in float32 and in the default
    dtype (bfloat16); the prompt in chunks of 4 tokens gives the greedy tokens of one chunk."""
    path, logits, tokens = q4
    eng = hybridmoe.load(path, device="cuda", dtype=dtype, expert_cache_slots=slots, experts_tier=tier)
    experts = eng.model.experts.experts
    assert experts.streams and all(dev.grouped_prefill for dev in experts.stages)
    seen = spy_layers(experts, monkeypatch)
    got = eng.logits(IDS).float().cpu()
    assert ((got - logits).abs().max() / logits.abs().max()).item() < (2.0**-5 if dtype else 2.0**-4)
    assert [s[0] for s in seen] == eng.model.moe_layers()
    assert eng.model.experts.take_stats()["bytes_copied"] > 0
    runs = []
    for chunk in (4, 512):
        eng.prefill_chunk = chunk
        runs.append(list(eng.generate(IDS[:6], temperature=0, max_tokens=10, ignore_eos=True))[-1].token_ids)
    assert runs[0] == runs[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_gpus_stream_shares_of_each_layer(q4, monkeypatch):
    """Two GPUs: both stream shares of the layers' experts (copies over two links, outputs back to the layer's
    GPU), with the CPU engine's logits within bf16 kernel tolerance."""
    path, logits, _ = q4
    eng = hybridmoe.load(path, device="cuda", dtype="float32", devices=2, expert_cache_slots=0,
                         experts_tier="pinned")
    experts = eng.model.experts.experts
    assert sorted(experts.streams) == [0, 1]
    loads = []
    for s, stream in experts.streams.items():
        load = stream.load
        monkeypatch.setattr(stream, "load", lambda layer, es, s=s, load=load: loads.append(s) or load(layer, es))
    got = eng.logits(IDS).cpu()
    assert ((got - logits).abs().max() / logits.abs().max()).item() < 2.0**-5
    assert set(loads) == {0, 1}


def test_streamed_prefill_keeps_the_decode_slot_tables_in_step(q4):
    """Partly cached layers decode through slot tables (expert -> slot, read by the graph and its host node). A
    prompt streamed after such decode steps admits experts into the cache, evicting others: the tables follow, so
    the next decode computes each expert from its own slot. Same tokens as the host-placed decode (graphs off)."""
    from hybridmoe.models.graphs import DecodeGraphs
    kw = dict(expert_cache_slots=6, cpu_activations="int8")  # the default costs: copies at prefill, CPU at decode
    runs = []
    for graphs in (False, True):
        eng, experts = streamed(q4[0], **kw)
        if graphs:
            eng.model.decode_graphs = DecodeGraphs(eng.model, capture=False)
        runs.append([list(eng.generate(ids, temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids
                     for ids in (IDS[:12], IDS[12:30], IDS[3:25])])
        if graphs:
            assert experts.slot_tables and all(n is not None and n.slots is not None
                                               for n in experts.cpu_nodes.values())
    assert runs[0] == runs[1]
