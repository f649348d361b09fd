import pytest
import torch

from hybridmoe import GenerationConfig
from hybridmoe.engine.sampler import apply_repetition_penalty, filter_logits, make_sampler


def test_greedy_takes_argmax():
    s = make_sampler(GenerationConfig(temperature=0))
    assert s(torch.tensor([0.1, 3.0, 2.0]), []) == 1


def test_seed_reproducible_and_distribution_respects_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=7)
    a = [make_sampler(cfg)(logits, []) for _ in range(1)]
    s1, s2 = make_sampler(cfg), make_sampler(cfg)
    seq1 = [s1(logits, []) for _ in range(50)]
    seq2 = [s2(logits, []) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    assert set(seq1) <= set(torch.topk(logits, 3).indices.tolist())


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cfg = GenerationConfig(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0)
    kept = torch.isfinite(filter_logits(probs.log(), cfg))
    assert kept.tolist() == [True, True, False, False]


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.6, 0.3, 0.05, 0.05])
    cfg = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert torch.isfinite(filter_logits(probs.log(), cfg)).tolist() == [True, True, False, False]


def test_repetition_penalty_pushes_seen_tokens_down():
    out = apply_repetition_penalty(torch.tensor([2.0, -1.0, 1.0]), [0, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 1.0]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1), dict(max_tokens=0),
                                 dict(stop=("",))])
def test_invalid_settings_rejected(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_unknown_setting_rejected():
    with pytest.raises(ValueError, match="temprature"):
        GenerationConfig().updated(temprature=1)


def test_frequency_and_presence_penalties_subtract_as_openai_defines_them():
    from hybridmoe.engine.sampler import apply_additive_penalties
    out = apply_additive_penalties(torch.tensor([2.0, 1.0, 0.5, 0.0]), [0, 0, 2], 0.5, 0.25)
    # token 0 seen twice: 2 - 2*0.5 - 0.25; token 2 once: 0.5 - 0.5 - 0.25; unseen tokens unchanged
    assert out.tolist() == [0.75, 1.0, -0.25, 0.0]
    with pytest.raises(ValueError, match="frequency_penalty"):
        GenerationConfig(frequency_penalty=3)
