"""The cost model that places experts on the CPU or copies them to a GPU slot: pure Python, no tensors."""
import pytest

from hybridmoe.offload.scheduler import CostModel

V3 = 44_000_000, 6 * 2048 * 7168  # one DeepSeek-V3 expert at 4 bits (bytes), ~88 MFLOP per token
# A prefill step's uncached experts: most get a few tokens, some many.
TOKENS = [1, 3, 40, 2, 1, 120, 7, 1, 15, 2, 60, 1, 4, 9, 1, 300, 2, 1, 5, 30]
REAL = CostModel(cpu_bytes_per_s=80e9, cpu_flops=1e12, h2d_bytes_per_s=25e9, gpu_bytes_per_s=2e12, gpu_flops=4e14)


def makespan(m: CostModel, tokens: list[int], on_cpu: list[bool], busy_s: float = 0.0) -> float:
    """The layer time split() predicts: the CPU's experts and the GPU's copies and compute run at once."""
    nbytes, flops = V3
    cpu = sum(m.cpu_s(n, nbytes, flops) for n, c in zip(tokens, on_cpu) if c)
    copies = sum(m.copy_s(nbytes) for c in on_cpu if not c)
    gpu = busy_s + sum(m.gpu_s(n, nbytes, flops) for n, c in zip(tokens, on_cpu) if not c)
    return max(cpu, copies, gpu)


def test_cost_model_decode_on_cpu_prefill_copies():
    assert REAL.place(1, *V3, cached=False) == "cpu"
    assert REAL.place(512, *V3, cached=False) == "copy"
    assert REAL.place(1, *V3, cached=True) == "gpu"
    assert 1 < REAL.crossover_tokens(*V3) < 512


def test_cost_model_validates():
    with pytest.raises(ValueError, match="h2d"):
        CostModel(h2d_bytes_per_s=0)


def test_split_copies_everything_when_the_cpu_is_slow():
    m = CostModel(cpu_bytes_per_s=1e6, cpu_flops=1e6)
    assert m.split(TOKENS, *V3) == [False] * len(TOKENS)


def test_split_keeps_everything_on_the_cpu_when_copies_are_slow():
    m = CostModel(h2d_bytes_per_s=1e6)
    assert m.split(TOKENS, *V3) == [True] * len(TOKENS)
    assert m.split([], *V3) == []


def test_split_balances_the_cpu_against_the_copies():
    on_cpu = REAL.split(TOKENS, *V3)
    assert any(on_cpu) and not all(on_cpu)
    # the few-token experts go to the CPU
    assert max(n for n, c in zip(TOKENS, on_cpu) if c) <= min(n for n, c in zip(TOKENS, on_cpu) if not c)
    # no other cut of the experts by token count predicts a shorter layer, all-CPU and all-copy included
    ranked = sorted(range(len(TOKENS)), key=TOKENS.__getitem__)
    best = makespan(REAL, TOKENS, on_cpu)
    for j in range(len(TOKENS) + 1):
        cut = [False] * len(TOKENS)
        for i in ranked[:j]:
            cut[i] = True
        assert best <= makespan(REAL, TOKENS, cut)
    assert best < makespan(REAL, TOKENS, [True] * len(TOKENS)) and best < makespan(REAL, TOKENS, [False] * len(TOKENS))


def test_split_gives_the_cpu_more_when_the_gpu_is_busy_with_cached_experts():
    idle, busy = REAL.split(TOKENS, *V3), REAL.split(TOKENS, *V3, busy_s=0.05)
    assert sum(busy) > sum(idle) and all(b for i, b in zip(idle, busy) if i)


def test_split_is_deterministic_and_breaks_ties_by_order():
    on_cpu = REAL.split([4] * 10, *V3)
    assert on_cpu == REAL.split([4] * 10, *V3)
    assert 0 < sum(on_cpu) < 10 and on_cpu == sorted(on_cpu, reverse=True)


def test_ring_quota_balances_pcie_against_the_cpu():
    nbytes, flops = V3
    # equal rates: half the missing experts are copied ahead, the CPU computes the other half meanwhile
    even = CostModel(cpu_bytes_per_s=50e9, h2d_bytes_per_s=50e9)
    assert even.ring_quota(8, nbytes, flops) == 4
    assert even.ring_quota(0, nbytes, flops) == 0
    # PCIe 4x slower than the CPU reads (an RTX card beside fast DDR5): few copies; much faster: most go ahead
    assert CostModel(cpu_bytes_per_s=100e9, h2d_bytes_per_s=25e9).ring_quota(8, nbytes, flops) == 1
    assert CostModel(cpu_bytes_per_s=20e9, h2d_bytes_per_s=80e9).ring_quota(8, nbytes, flops) == 7
    for m in (even, REAL, CostModel(cpu_bytes_per_s=1e6)):
        r = m.ring_quota(8, nbytes, flops)
        span = lambda q: max(q * m.copy_s(nbytes), (8 - q) * m.cpu_s(1, nbytes, flops))  # noqa: E731
        assert span(r) == min(span(q) for q in range(9))
