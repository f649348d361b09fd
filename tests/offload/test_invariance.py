"""accelerator=cpu: the whole offload machinery (slots, copies, prefetch, scheduler, stages) runs on the CPU.
Greedy tokens and logits must be bit-identical whatever the cache size, prefetch, device count or host tier."""
import itertools

import pytest
import torch

import hybridmoe
from hybridmoe.offload.scheduler import CostModel

IDS = list(range(20, 60))


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen2_moe", "mixtral"])
def reference(request, tiny_models):
    path = tiny_models(request.param)
    eng = hybridmoe.load(path)
    done = list(eng.generate(IDS[:8], temperature=0, max_tokens=24, ignore_eos=True))[-1]
    return path, eng.logits(IDS), done.token_ids


CASES = list(itertools.product([0, 3, 12, None], [True, False], [1, 2], ["mmap", "pinned"]))


@pytest.mark.parametrize("slots,prefetch,devices,tier", CASES)
def test_offload_is_lossless(reference, slots, prefetch, devices, tier):
    path, logits, tokens = reference
    eng = hybridmoe.load(path, accelerator="cpu", devices=devices, expert_cache_slots=slots, prefetch=prefetch,
                         experts_tier=tier)
    assert torch.equal(eng.logits(IDS), logits)
    done = list(eng.generate(IDS[:8], temperature=0, max_tokens=24, ignore_eos=True))[-1]
    assert done.token_ids == tokens


def test_stats_report_cache_activity(tiny_models):
    eng = hybridmoe.load(tiny_models("deepseek_v3"), accelerator="cpu", expert_cache_slots=6)
    stats = [e for e in eng.generate(IDS[:8], temperature=0, max_tokens=12, ignore_eos=True)
             if isinstance(e, hybridmoe.Stats)]
    decode = [s.extra for s in stats if s.phase == "decode"]
    assert all({"cache_hits", "cache_misses", "bytes_copied", "layers", "expert_tokens"} <= d.keys() for d in decode)
    assert sum(d["cache_hits"] for d in decode) > 0
    assert sum(d["cache_misses"] for d in decode) > 0
    assert any("prefetch_recall" in d for d in decode)
    assert max(d["cached_experts"][0] for d in decode) <= 6


def test_prefetch_ring_turns_predicted_misses_into_hits(tiny_models):
    """Predicted experts the warm cache will not admit go to the prefetch ring and are served from there."""
    path = tiny_models("qwen3_moe")
    runs = {}
    for prefetch in (False, True):
        eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=2, prefetch=prefetch)
        events = list(eng.generate(IDS[:8], temperature=0, max_tokens=24, ignore_eos=True))
        decode = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
        ahead = sum(c.get("ahead", 0) for d in decode for c in d["layers"].values())
        runs[prefetch] = events[-1].token_ids, sum(d["cache_hits"] for d in decode), ahead
    assert runs[True][0] == runs[False][0]
    assert runs[False][2] == 0 and runs[True][2] > 0
    assert runs[True][1] > runs[False][1] + runs[True][2] // 2


def test_prefetch_copies_only_what_the_cost_model_pays_for(tiny_models):
    """With copies far slower than the CPU, the ring quota is zero: predictions copy nothing, the CPU serves."""
    path = tiny_models("qwen3_moe")
    slow = CostModel(cpu_bytes_per_s=1e12, h2d_bytes_per_s=1e3)
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=2, prefetch=True, cost_model=slow)
    events = list(eng.generate(IDS[:8], temperature=0, max_tokens=12, ignore_eos=True))
    decode = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
    assert sum(c.get("ahead", 0) for d in decode for c in d["layers"].values()) == 0
    assert sum(c["cpu"] for d in decode for c in d["layers"].values()) > 0


def test_two_devices_split_layers_into_stages(tiny_models):
    eng = hybridmoe.load(tiny_models("mixtral"), accelerator="cpu", devices=2, expert_cache_slots=4)
    stages = eng.model.experts.experts.layer_stage
    assert stages == {0: 0, 1: 1}
    assert [len(s.cache.key_in) for s in eng.model.experts.experts.stages] == [4, 4]


@pytest.mark.parametrize("sizes,n,want", [([1, 1, 1, 1], 2, [0, 0, 1, 1]), ([5, 1, 1, 1, 1, 1], 2, [0, 1, 1, 1, 1, 1]),
                                          ([1] * 6, 3, [0, 0, 1, 1, 2, 2]), ([2, 1, 1], 1, [0, 0, 0])])
def test_split_layers_balances_bytes(sizes, n, want):
    from hybridmoe.offload.plan import split_stages
    assert split_stages(sizes, n) == want


def test_options_are_validated(tiny_models):
    with pytest.raises(ValueError, match="experts-tier"):
        hybridmoe.load(tiny_models("deepseek_v3"), accelerator="cpu", experts_tier="disk")
    with pytest.raises(hybridmoe.ConfigError, match="accelerator"):
        hybridmoe.load(tiny_models("deepseek_v3"), devices=2)


# Cost models for prefill: copies always pay off (every uncached expert goes through the slots), or the CPU and the
# copies cost alike (split() gives the CPU part of them, and each layer's experts run on both sides).
PREFILL_COSTS = {"copy": dict(cpu_bytes_per_s=1e3, cpu_flops=1e3, h2d_bytes_per_s=1e15),
                 "split": dict(cpu_bytes_per_s=1e9, cpu_flops=1e9, h2d_bytes_per_s=1e9)}


@pytest.mark.parametrize("slots,placement", [(0, "copy"), (5, "copy"), (0, "split"), (5, "split")])
def test_prefill_copies_through_staging_slots_are_lossless(reference, slots, placement):
    from hybridmoe.offload.scheduler import CostModel
    path, logits, tokens = reference
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=slots, prefetch=False)
    eng.model.experts.experts.cost = CostModel(**PREFILL_COSTS[placement], gpu_bytes_per_s=1e15, gpu_flops=1e18,
                                               launch_s=0)
    assert torch.equal(eng.logits(IDS), logits)
    stats = eng.model.experts.take_stats()
    assert stats["bytes_copied"] > 0 and all(c["copies"] for c in stats["layers"].values())
    assert all(bool(c["cpu"]) == (placement == "split") for c in stats["layers"].values())
    done = list(eng.generate(IDS[:8], temperature=0, max_tokens=24, ignore_eos=True))[-1]
    assert done.token_ids == tokens


@pytest.mark.parametrize("slots", [None, 5])
def test_grouped_slot_calls_place_every_output(reference, slots, monkeypatch):
    """On CUDA a prefill step's slot experts run as one call per slot buffer: one gather of their tokens, one
    scatter of the outputs. Forced here on the CPU (whose stand-in otherwise runs one call per expert), the logits
    stay those of the reference: each expert's rows come back to their own [token, k] positions. With 5 slots,
    every miss is copied: admitted experts join the cached ones' call, the others go through staging slots. With
    all of them (slots None), each layer takes the resident path."""
    path, logits, _ = reference
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=slots, prefetch=False)
    experts = eng.model.experts.experts
    if slots is not None:
        experts.cost = CostModel(**PREFILL_COSTS["copy"], gpu_bytes_per_s=1e15, gpu_flops=1e18, launch_s=0)
    for dev in experts.stages:
        dev.grouped_prefill = True
    sizes = []
    grouped = experts.store.compute_slots_prefill

    def spy(buffers, slot_ids, layer, x, counts):
        sizes.append(len(slot_ids))
        assert x.shape[0] == sum(counts)
        return grouped(buffers, slot_ids, layer, x, counts)

    monkeypatch.setattr(experts.store, "compute_slots_prefill", spy)
    resident = []
    start_resident = experts._start_resident_prefill
    monkeypatch.setattr(experts, "_start_resident_prefill", lambda dev, layer, *a: resident.append(layer)
                        or start_resident(dev, layer, *a))
    torch.testing.assert_close(eng.logits(IDS), logits, rtol=1e-5, atol=1e-5)
    assert sizes and max(sizes) > 1
    # every expert in a slot for good: tokens sorted by expert on the device, nothing placed on the host
    assert resident == (eng.model.moe_layers() if slots is None else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("slots,prefetch", [(3, True), (3, False), (None, True)])
def test_cuda_offload_agrees_with_the_cpu_run(reference, slots, prefetch):
    """On a GPU, with part of the experts in slots (copies, the prefetch ring, CPU experts, predictions read back
    without a host sync), or all of them: the same logits within float32 kernel tolerance and the same greedy
    tokens. (Float experts on a GPU keep one host sync per MoE layer; for quantized ones, whose slots run inside
    the decode graphs, see tests/gguf/test_gguf_offload.py.)"""
    path, logits, tokens = reference
    eng = hybridmoe.load(path, device="cuda", dtype="float32", expert_cache_slots=slots, prefetch=prefetch,
                         experts_tier="pinned")
    got = eng.logits(IDS).cpu()
    assert ((got - logits).abs().max() / logits.abs().max()).item() < 1e-3
    events = list(eng.generate(IDS[:8], temperature=0, max_tokens=24, ignore_eos=True))
    assert events[-1].token_ids == tokens
    decode = [e.extra for e in events if isinstance(e, hybridmoe.Stats) and e.phase == "decode"]
    assert any("prefetch_recall" in d for d in decode) == (prefetch and slots is not None)
    assert eng.model.decode_graphs.enabled
