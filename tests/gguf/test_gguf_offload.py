"""GGUF experts through the offload engine (accelerator = cpu): slots hold the raw blocks, and outputs are
bit-identical whatever the cache size, prefetch, device count or host tier."""

import pytest
import torch

import hybridmoe
from hybridmoe.offload.scheduler import CostModel

IDS = list(range(30, 60))
CPU_ONLY = CostModel(h2d_bytes_per_s=1e3)  # copies never pay off: every uncached expert runs on the CPU


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def q4(request, gguf_models):
    _, path = gguf_models(request.param, "q4_k_m")
    ref = hybridmoe.load(path)
    return path, ref.logits(IDS), list(ref.generate(IDS[:6], temperature=0, max_tokens=12,
                                                     ignore_eos=True))[-1].token_ids


@pytest.mark.parametrize("slots,prefetch,devices,tier",
                         [(0, True, 1, "mmap"), (5, True, 1, "pinned"), (5, False, 2, "mmap"), (None, True, 1, "mmap"),
                          (3, True, 2, "pinned")])
def test_gguf_offload_is_lossless(q4, slots, prefetch, devices, tier):
    path, logits, tokens = q4
    eng = hybridmoe.load(path, accelerator="cpu", devices=devices, expert_cache_slots=slots, prefetch=prefetch,
                         experts_tier=tier)
    assert torch.equal(eng.logits(IDS), logits)
    events = list(eng.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))
    assert events[-1].token_ids == tokens
    if slots:
        stats = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
        assert sum(s["cache_hits"] for s in stats) > 0


@pytest.mark.parametrize("activations", ["f32", "int8"])
def test_repacked_cpu_experts_match_the_packed_tier(q4, activations):
    """With no cache and no copies every expert runs on the CPU from the repacked copy (a decode step's experts in
    one call), as the packed tier without the offload engine computes them: bit-identical, in either activation
    mode."""
    path = q4[0]
    ref = hybridmoe.load(path, experts_tier="pinned", cpu_activations=activations)
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=0, cpu_repack=True,
                         cpu_activations=activations, cost_model=CPU_ONLY)
    assert torch.equal(eng.logits(IDS), ref.logits(IDS))
    want = list(ref.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids
    assert list(eng.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids == want


def test_int8_activations_on_the_mmap_tier_read_the_file_in_place(q4):
    """With 8-bit activations the mmap tier computes Q8_0 / Q4_K / Q6_K layers from the file's bytes (no repacked
    copy), the plain engine and the offload engine alike, bit for bit; the repacked copy of the pinned tier sums in
    another order and agrees to float32 rounding."""
    path = q4[0]
    plain = hybridmoe.load(path, cpu_activations="int8")
    store = plain.model.experts.store
    in_place = [layer for layer, on in store.raw_int8.items() if on]
    assert plain.model.experts.tier == "mmap" and in_place
    logits = plain.logits(IDS)
    tokens = list(plain.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids
    assert not set(in_place) & set(store.packed)
    off = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=0, cpu_activations="int8", cost_model=CPU_ONLY)
    assert torch.equal(off.logits(IDS), logits)
    assert list(off.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids == tokens
    assert not set(in_place) & set(off.model.experts.store.packed)
    packed = hybridmoe.load(path, experts_tier="pinned", cpu_activations="int8").logits(IDS)
    assert ((packed - logits).abs().max() / packed.abs().max()).item() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_cuda_decode_with_every_expert_resident_is_one_graph(gguf_models, tmp_path, family):
    """Every expert in a GPU slot: a decode step replays one captured graph for all layers, the experts' slots
    looked up on the device. Logits and greedy tokens as the CPU gives them, within kernel tolerance (prefill
    experts on a GPU run as bfloat16 matrix products)."""
    from hybridmoe.models.convert import convert
    hf, _ = gguf_models(family)
    path = convert(hf, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    ref = hybridmoe.load(path)
    want = ref.logits(IDS)
    tokens = list(ref.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids
    eng = hybridmoe.load(path, device="cuda", dtype="float32")
    got = eng.logits(IDS).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-2
    assert list(eng.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids == tokens
    graphs = eng.model.decode_graphs
    assert graphs.enabled and graphs.captured and graphs.spans() == [range(len(eng.model.layers))]


def test_cache_off_decode_queues_the_cpu_experts_as_device_work(q4):
    """With no expert cache and 8-bit activations the CPU's experts of a decode step are stream work (a host node
    on CUDA), so the decode segments need no host sync and a step is one span of all layers. Run here with the CPU
    standing in (segments eager): the plain engine's tokens, and every expert counted as served by the CPU."""
    from hybridmoe.models.graphs import DecodeGraphs
    path = q4[0]
    plain = hybridmoe.load(path, cpu_activations="int8")
    want = list(plain.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))[-1].token_ids
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=0, cpu_activations="int8", cost_model=CPU_ONLY)
    model = eng.model
    graphs = model.decode_graphs = DecodeGraphs(model, capture=False)
    events = list(eng.generate(IDS[:6], temperature=0, max_tokens=8, ignore_eos=True))
    assert events[-1].token_ids == want
    assert graphs.spans() == [range(len(model.layers))] and graphs.embeds and graphs.runs_head
    nodes = model.experts.experts.cpu_nodes
    assert set(nodes) == set(model.moe_layers()) and all(n is not None and n.runs == 7 for n in nodes.values())
    top_k = {i: model.layers[i].ffn.spec.top_k for i in model.moe_layers()}
    decode = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"][1:]
    assert decode and all(s["layers"][i]["cpu"] == s["layers"][i]["misses"] == k
                          for s in decode for i, k in top_k.items())
    assert all(s["cpu_expert_s"] > 0 for s in decode)  # the nodes' own clocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_cuda_decode_with_no_expert_cache_is_one_graph(gguf_models, tmp_path, family):
    """No expert in VRAM: each MoE layer's experts run on the CPU through a host node inside the step's graph (no
    host sync per layer), so a decode step is one graph replay, with the greedy tokens the CPU gives with the same
    8-bit activations."""
    from hybridmoe.models.convert import convert
    hf, _ = gguf_models(family)
    path = convert(hf, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    ref = hybridmoe.load(path, cpu_activations="int8")
    tokens = list(ref.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids
    eng = hybridmoe.load(path, device="cuda", dtype="float32", expert_cache_slots=0, cpu_activations="int8",
                         cost_model=CPU_ONLY)
    events = list(eng.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))
    assert events[-1].token_ids == tokens
    graphs = eng.model.decode_graphs
    assert graphs.enabled and graphs.captured and graphs.spans() == [range(len(eng.model.layers))]
    nodes = eng.model.experts.experts.cpu_nodes
    assert all(n is not None and n.runs >= 11 for n in nodes.values())


def test_partly_cached_decode_splits_hits_and_misses_on_the_device(q4):
    """Part of the experts in slots, 8-bit CPU activations: the decode segments run each MoE layer without a host
    sync (the slot table on the device picks the GPU's experts, a host node computes the others, outputs combined
    in k order), and hot experts enter the cache between steps. The same tokens and the same hits as the
    host-placed path of the same engine (graphs off), bit for bit; the CPU stand-in copies at once, so both admit
    the same experts at the same steps."""
    from hybridmoe.models.graphs import DecodeGraphs
    path = q4[0]
    kw = dict(accelerator="cpu", expert_cache_slots=6, cpu_activations="int8", cost_model=CPU_ONLY)
    eager = hybridmoe.load(path, **kw)
    want = list(eager.generate(IDS[:6], temperature=0, max_tokens=16, ignore_eos=True))
    eng = hybridmoe.load(path, **kw)
    model = eng.model
    graphs = model.decode_graphs = DecodeGraphs(model, capture=False)
    got = list(eng.generate(IDS[:6], temperature=0, max_tokens=16, ignore_eos=True))
    assert got[-1].token_ids == want[-1].token_ids
    assert graphs.spans() == [range(len(model.layers))] and not model.observers
    nodes = model.experts.experts.cpu_nodes
    assert all(n is not None and n.slots is not None for n in nodes.values())

    def counts(events):
        return [(e.extra["cache_hits"], e.extra["cache_misses"]) for e in events
                if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
    assert counts(got) == counts(want) and sum(h for h, _ in counts(got)) > 0
    assert torch.equal(eng.logits(IDS), eager.logits(IDS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_cuda_partly_cached_decode_is_one_graph(gguf_models, tmp_path, family):
    """Part of the experts in VRAM: the step is still one graph (slot table on the device, host node for the rest),
    hot experts land in the cache between steps, and each step's logits stay those of the CPU with 8-bit
    activations within kernel tolerance (the GPU computes its experts without rounding x)."""
    from hybridmoe.models.convert import convert
    from hybridmoe.layers.cache import Batch
    hf, _ = gguf_models(family)
    path = convert(hf, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    stream = IDS[:6] + IDS[:6] * 3  # repeats, so that experts are used again and enter the cache
    want = hybridmoe.load(path, cpu_activations="int8").logits(stream)
    eng = hybridmoe.load(path, device="cuda", dtype="float32", expert_cache_slots=6, cpu_activations="int8",
                         cost_model=CPU_ONLY)
    model = eng.model
    cache = model.new_cache(1, 64)
    hits = 0
    with torch.inference_mode():
        for pos, t in enumerate(stream):
            got = model(torch.tensor([[t]], device="cuda"), Batch.make([pos], [1], [0], "cuda"), cache,
                        last_only=True)[0].cpu()
            assert ((got - want[pos]).abs().max() / want[pos].abs().max()).item() < 5e-2, pos
            hits += model.experts.take_stats()["cache_hits"]
    graphs = model.decode_graphs
    assert graphs.enabled and graphs.captured and graphs.spans() == [range(len(model.layers))]
    assert hits > 0 and all(n.slots is not None for n in model.experts.experts.cpu_nodes.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_cuda_non_expert_weights_kept_as_blocks(gguf_models, tmp_path, family):
    """--gpu-weights quantized: the linear layers on the GPU hold the file's Q8_0 blocks (GpuQuantLinear), the
    decode graphs still capture whole steps, and the logits and greedy tokens are those of the CPU run within
    kernel tolerance."""
    from hybridmoe.models.convert import convert
    from hybridmoe.layers.gpu_quant_linear import GpuQuantLinear
    hf, _ = gguf_models(family)
    path = convert(hf, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    ref = hybridmoe.load(path, device="cpu")
    want = ref.logits(IDS)
    tokens = list(ref.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids
    eng = hybridmoe.load(path, device="cuda", dtype="float32", gpu_weights="quantized")
    assert any(isinstance(m, GpuQuantLinear) for m in eng.model.modules())
    got = eng.logits(IDS).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-2
    assert list(eng.generate(IDS[:6], temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids == tokens
    assert eng.model.decode_graphs.enabled and eng.model.decode_graphs.captured
