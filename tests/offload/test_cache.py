"""The slot allocator and its LFU-with-decay policy, without tensors."""
import pytest

from hybridmoe.offload.cache import SlotCache
from hybridmoe.offload.scheduler import CostModel


def test_fills_free_slots_then_evicts_the_coldest():
    c = SlotCache(2, decay=0.5)
    for key, uses in [((0, 1), 3), ((0, 2), 1)]:
        c.touch(key, uses)
        assert c.admit(key)[1] is None
    c.touch((0, 3), 2)
    slot, evicted = c.admit((0, 3))
    assert evicted == (0, 2) and c.lookup((0, 3)) == slot and c.lookup((0, 2)) is None


def test_decay_makes_old_popularity_fade():
    c = SlotCache(1, decay=0.5)
    c.touch((0, 1), 8)
    c.admit((0, 1))
    for _ in range(5):
        c.tick()
    c.touch((0, 2), 1)  # 8 * 0.5**5 = 0.25 < 1
    assert c.would_admit((0, 2))
    assert c.admit((0, 2))[1] == (0, 1)


def test_never_evicts_a_pinned_expert():
    c = SlotCache(1)
    c.touch((0, 1))
    c.admit((0, 1))
    c.pin((0, 1))
    c.touch((0, 2), 100)
    assert c.admit((0, 2), force=True) is None
    c.unpin((0, 1))
    assert c.admit((0, 2), force=True)[1] == (0, 1)


def test_hotter_cached_expert_is_not_replaced_without_force():
    c = SlotCache(1)
    c.touch((0, 1), 5)
    c.admit((0, 1))
    c.touch((0, 2), 1)
    assert not c.would_admit((0, 2)) and c.admit((0, 2)) is None
    assert c.admit((0, 2), force=True)[1] == (0, 1)


def test_zero_slots():
    c = SlotCache(0)
    c.touch((0, 1))
    assert c.admit((0, 1), force=True) is None and not c.would_admit((0, 1))


def test_cost_model_decode_on_cpu_prefill_copies():
    m = CostModel(cpu_bytes_per_s=80e9, cpu_flops=1e12, h2d_bytes_per_s=25e9, gpu_bytes_per_s=2e12, gpu_flops=4e14)
    nbytes, flops = 44_000_000, 6 * 2048 * 7168  # one DeepSeek-V3 expert at 4 bits, ~88 MFLOP per token
    assert m.place(1, nbytes, flops, cached=False) == "cpu"
    assert m.place(512, nbytes, flops, cached=False) == "copy"
    assert m.place(1, nbytes, flops, cached=True) == "gpu"
    assert 1 < m.crossover_tokens(nbytes, flops) < 512


def test_cost_model_validates():
    with pytest.raises(ValueError, match="h2d"):
        CostModel(h2d_bytes_per_s=0)
