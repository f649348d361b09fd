"""The slot allocator and its LFU-with-decay policy, without tensors."""
from hybridmoe.offload.cache import SlotCache


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


def test_admission_can_ask_for_repeated_use():
    c = SlotCache(1, decay=0.5)
    c.touch((0, 1))
    c.admit((0, 1))
    for _ in range(4):
        c.tick()
    c.touch((0, 2))  # used once: hotter than the faded victim, but not used repeatedly
    assert c.would_admit((0, 2)) and not c.would_admit((0, 2), min_score=1.5)
    c.tick()
    c.touch((0, 2))
    assert c.would_admit((0, 2), min_score=1.5)
