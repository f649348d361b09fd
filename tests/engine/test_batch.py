"""The batch runner: rows decoded together give each request exactly what it gets alone (greedy and seeded), a
cancelled row leaves at once, and with offloaded experts a batched step computes each expert once for all rows."""
import random
import threading
import time

import pytest

import hybridmoe
from hybridmoe import ContextOverflowError, Done, GenerationConfig, Text
from hybridmoe.engine.batch import BatchEngine
from hybridmoe.engine.scheduler import QueueFull, SchedulerConfig

GREEDY = GenerationConfig(temperature=0, max_tokens=16, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def solo(engine, prompt, cfg) -> Done:
    return list(engine.generate(prompt, cfg))[-1]


def batched(engine, items, cfg, **sched) -> list[Done]:
    with BatchEngine(engine, SchedulerConfig(**sched)) as be:
        reqs = [be.submit(p, cfg) for p in items]
        return [list(r.events())[-1] for r in reqs]


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("offload", [False, True], ids=["local", "offload-cpu"])
def test_batched_greedy_equals_each_request_alone(tiny_models, family, offload):
    kw = {"accelerator": "cpu", "expert_cache_slots": 4} if offload else {}
    engine = hybridmoe.load(tiny_models(family), **kw)
    items = prompts(6)
    alone = [solo(engine, p, GREEDY) for p in items]
    # 4 rows at once, prompts in chunks of at most 16 tokens: rows at different positions in every step
    together = batched(engine, items, GREEDY, max_seqs=4, prefill_tokens=16)
    assert [d.token_ids for d in together] == [d.token_ids for d in alone]
    assert all(d.reason == "length" and d.completion_tokens == 16 for d in together)


def test_seeded_sampling_with_penalties_and_stops_equals_alone(tiny_models):
    engine = hybridmoe.load(tiny_models("deepseek_v3"))
    cfg = GenerationConfig(temperature=0.9, seed=11, max_tokens=20, frequency_penalty=0.5, presence_penalty=0.3,
                           repetition_penalty=1.1)
    items = ["The quick brown", "Hello world! How", "def add(a, b):", "A router picks"]
    alone = [solo(engine, p, cfg) for p in items]
    together = batched(engine, items, cfg, max_seqs=4)
    assert [(d.token_ids, d.text, d.reason) for d in together] == [(d.token_ids, d.text, d.reason) for d in alone]
    stop = alone[0].text[3:5]
    cfg_stop = cfg.updated(stop=(stop,))
    assert batched(engine, items[:1], cfg_stop)[0].text == solo(engine, items[0], cfg_stop).text


def test_the_demo_model_batched_equals_alone():
    engine = hybridmoe.load("demo")
    items = ["Once upon a time", "The cat", "Hello, my name is", "In the beginning there was"]
    cfg = GenerationConfig(temperature=0, max_tokens=12)
    alone = [solo(engine, p, cfg) for p in items]
    assert [d.token_ids for d in batched(engine, items, cfg, max_seqs=4)] == [d.token_ids for d in alone]


def test_offloaded_batched_step_computes_each_expert_once(tiny_models):
    engine = hybridmoe.load(tiny_models("deepseek_v3"), accelerator="cpu", expert_cache_slots=4)
    store = engine.model.experts.store
    call = [0]
    calls: list[tuple[int, int, object, int]] = []  # (forward call, layer, expert or slot, rows) per computation

    def counting(name):
        inner = getattr(store, name)

        def wrapper(*args):
            if name == "compute_host":  # (layer, e, x): an expert on the CPU
                calls.append((call[0], args[0], args[1], args[2].shape[0]))
            else:  # (buffers, slot, layer, x): an expert in a slot of the cache or of the prefetch ring
                calls.append((call[0], args[2], (id(args[0]), args[1]), args[3].shape[0]))
            return inner(*args)
        return wrapper

    hook = engine.model.register_forward_pre_hook(lambda *_: call.__setitem__(0, call[0] + 1))
    with BatchEngine(engine, SchedulerConfig(max_seqs=4)) as be:
        store.compute_host, store.compute_slot = counting("compute_host"), counting("compute_slot")
        reqs = [be.submit(p, GREEDY.updated(max_tokens=6)) for p in prompts(4, seed=3)]
        done = [list(r.events())[-1] for r in reqs]
    del store.compute_host, store.compute_slot
    hook.remove()
    assert all(d.completion_tokens == 6 for d in done)
    assert be.metrics.decode_rows > be.metrics.decode_steps  # steps with several rows happened
    keys = [(s, layer, e) for s, layer, e, _ in calls]
    assert len(keys) == len(set(keys)), "an expert ran more than once in a forward call"
    assert any(rows > 1 for *_, rows in calls)  # ... once, on all the rows routed to it


def test_cancel_leaves_the_batch_before_the_next_step(tiny_models):
    engine = hybridmoe.load(tiny_models("deepseek_v3"))
    with BatchEngine(engine, SchedulerConfig(max_seqs=2)) as be:
        long = GenerationConfig(temperature=0, max_tokens=400, ignore_eos=True)
        seen = threading.Event()
        a = be.submit([5, 6, 7], long, on_event=lambda ev: seen.set() if isinstance(ev, Text) else None)
        b = be.submit([8, 9], long)
        assert seen.wait(60)
        a.cancel()
        t0 = time.perf_counter()
        while be.running != 1:
            assert time.perf_counter() - t0 < 10
            time.sleep(0.001)
        assert a.done.reason == "cancelled" and a.done.completion_tokens < 400
        b.cancel()
        assert list(b.events())[-1].reason == "cancelled"
    assert be.metrics.requests == {"cancelled": 2}


def test_bad_requests_are_refused_at_submit(tiny_models):
    engine = hybridmoe.load(tiny_models("deepseek_v3"), context=32)
    with BatchEngine(engine, SchedulerConfig(max_seqs=1, max_queue=0)) as be:
        with pytest.raises(ContextOverflowError, match="context holds 32"):
            be.submit(list(range(3, 40)), GREEDY)
        with pytest.raises(ValueError, match="empty"):
            be.submit([], GREEDY)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            be.submit([10 ** 6], GREEDY)
        first = be.submit([3, 4, 5], GenerationConfig(temperature=0, max_tokens=20, ignore_eos=True))
        with pytest.raises(QueueFull):  # the only slot is taken and no one may wait
            be.submit([3, 4], GREEDY)
        first.cancel()


def test_generation_stops_at_the_context_end_as_alone(tiny_models):
    engine = hybridmoe.load(tiny_models("deepseek_v3"), context=16)
    items = [list(range(10, 20)), list(range(30, 35))]
    cfg = GenerationConfig(temperature=0, max_tokens=100, ignore_eos=True)
    alone = [solo(engine, p, cfg) for p in items]
    together = batched(engine, items, cfg, max_seqs=2)
    assert [(d.reason, d.token_ids) for d in together] == [(d.reason, d.token_ids) for d in alone]
    assert together[0].reason == "context"


def test_a_failing_row_ends_its_request_and_the_runner_goes_on(tiny_models, monkeypatch):
    import hybridmoe.engine.batch as batch_mod
    engine = hybridmoe.load(tiny_models("deepseek_v3"))
    real = batch_mod.make_sampler

    def make(cfg):
        sample = real(cfg)

        def maybe_fail(logits, history):
            if history[0] == 99:
                raise RuntimeError("sampler broke")
            return sample(logits, history)
        return maybe_fail

    monkeypatch.setattr(batch_mod, "make_sampler", make)
    good = [5, 6, 7, 8]
    with BatchEngine(engine, SchedulerConfig(max_seqs=2)) as be:
        bad_req, good_req = be.submit([99, 6, 7], GREEDY), be.submit(good, GREEDY)
        bad = list(bad_req.events())
        assert bad[-1].reason == "error" and "sampler broke" in bad[-2].message
        assert list(good_req.events())[-1].token_ids == solo(engine, good, GREEDY).token_ids
        assert list(be.submit(good, GREEDY).events())[-1].reason == "length"  # the runner still serves
