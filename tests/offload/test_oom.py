"""Out of GPU memory never ends an answer: the engine shrinks its expert cache, says so, and goes on."""
import torch

import hybridmoe
from hybridmoe import Done, Notice

IDS = list(range(20, 40))


def test_oom_mid_answer_shrinks_cache_and_keeps_tokens(tiny_models, monkeypatch):
    path = tiny_models("deepseek_v3")
    want = list(hybridmoe.load(path).generate(IDS, temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=8)
    model = eng.model
    calls = {"n": 0}
    real = type(model).forward

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # a decode step
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward", flaky)
    events = list(eng.generate(IDS, temperature=0, max_tokens=12, ignore_eos=True))
    notices = [e for e in events if isinstance(e, Notice)]
    assert notices and "shrunk" in notices[0].message
    assert isinstance(events[-1], Done) and events[-1].reason == "length"
    assert events[-1].token_ids == want
    assert eng.model.experts.experts.stages[0].cache.n_slots == 4


def test_oom_at_load_takes_fewer_slots_and_says_so(tiny_models, monkeypatch):
    from hybridmoe.offload.store import DenseStore
    real = DenseStore.new_slots

    def small_gpu(self, n, device):
        if n > 5:
            raise torch.OutOfMemoryError("simulated")
        return real(self, n, device)

    monkeypatch.setattr(DenseStore, "new_slots", small_gpu)
    eng = hybridmoe.load(tiny_models("deepseek_v3"), accelerator="cpu", expert_cache_slots=20)
    assert eng.model.experts.slots == [5]
    events = list(eng.generate(IDS[:5], temperature=0, max_tokens=2))
    assert any(isinstance(e, Notice) and "using 5" in e.message for e in events)


def test_popularity_round_trip_warms_the_cache(tiny_models, tmp_path):
    path = tiny_models("deepseek_v3")
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=4, prefetch=False)
    list(eng.generate(IDS, temperature=0, max_tokens=8, ignore_eos=True))
    pop = tmp_path / "pop.json"
    eng.model.experts.save_popularity(pop)
    fresh = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=4, prefetch=False)
    assert fresh.model.experts.load_popularity(pop) == 4
    hot = sorted(eng.model.experts.popularity.items(), key=lambda kv: -kv[1])[0][0]
    assert fresh.model.experts.experts.stages[0].cache.lookup(hot) is not None
