"""GGUF experts through the offload engine (accelerator = cpu): slots hold the raw blocks, and outputs are
bit-identical whatever the cache size, prefetch, device count or host tier (with exact activations: the CPU
standing in for a GPU computes slots with the float32 kernels)."""

import pytest
import torch

import hybridmoe
from hybridmoe.offload.scheduler import CostModel

IDS = list(range(30, 60))
CPU_ONLY = CostModel(h2d_bytes_per_s=1e3)  # copies never pay off: every uncached expert runs on the CPU


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def q4(request, gguf_models):
    _, path = gguf_models(request.param, "q4_k_m")
    ref = hybridmoe.load(path, cpu_activations="f32")
    return path, ref.logits(IDS), list(ref.generate(IDS[:6], temperature=0, max_tokens=12,
                                                     ignore_eos=True))[-1].token_ids


@pytest.mark.parametrize("slots,prefetch,devices,tier",
                         [(0, True, 1, "mmap"), (5, True, 1, "pinned"), (5, False, 2, "mmap"), (None, True, 1, "mmap"),
                          (3, True, 2, "pinned")])
def test_gguf_offload_is_lossless(q4, slots, prefetch, devices, tier):
    path, logits, tokens = q4
    eng = hybridmoe.load(path, accelerator="cpu", devices=devices, expert_cache_slots=slots, prefetch=prefetch,
                         experts_tier=tier, cpu_activations="f32")
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
    from hybridmoe.formats.convert import convert
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
