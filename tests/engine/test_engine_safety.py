"""One engine used from several threads, non-finite logits, and settings out of range: a clear outcome every time,
never silently wrong text."""
import threading

import pytest
import torch

import hybridmoe
from hybridmoe import Done, Error, Text
from hybridmoe.errors import ConfigError, EngineBusyError

PROMPTS = ["The quick brown", "Mixture of experts", "def add(a, b):", "Hello world! How", "Lists, tuples and",
           "A router picks"]


@pytest.fixture(scope="module")
def engine(tiny_models):
    return hybridmoe.load(tiny_models("deepseek_v3"))


def answer(engine, prompt: str, n: int = 12) -> tuple[int, ...]:
    done = list(engine.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True))[-1]
    assert isinstance(done, Done) and done.reason == "length"
    return done.token_ids


def test_threads_sharing_an_engine_get_their_solo_answers(engine):
    """Shared KV cache and cancel flag: concurrent generations used to interleave and give wrong text with no
    error (5 of 6 outputs differed). Now they take turns; 10 trials of two threads each."""
    solo = {p: answer(engine, p) for p in PROMPTS}
    for trial in range(10):
        pair = [PROMPTS[trial % len(PROMPTS)], PROMPTS[(trial + 1) % len(PROMPTS)]]
        got, errors, start = {}, [], threading.Barrier(2)

        def run(prompt):
            try:
                start.wait()
                got[prompt] = answer(engine, prompt)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
        threads = [threading.Thread(target=run, args=(p,)) for p in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and got == {p: solo[p] for p in pair}, trial


def test_logits_from_another_thread_waits_for_a_running_generation(engine, tiny_models):
    ids = [5, 17, 33, 101, 7]
    want = engine.logits(ids)
    events = engine.generate("Hello", temperature=0, max_tokens=6, ignore_eos=True)
    next(events)  # this generation now holds the engine
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("logits", engine.logits(ids)))
    t.start()
    t.join(timeout=0.5)
    assert t.is_alive()  # waiting its turn, not running beside the open generation
    rest = list(events)
    t.join(timeout=60)
    assert rest[-1].reason == "length" and torch.equal(box["logits"], want)


def test_second_generation_in_the_same_thread_is_a_clear_error(engine):
    first = engine.generate("Hello", temperature=0, max_tokens=5, ignore_eos=True)
    next(first)
    second = engine.generate("World", temperature=0, max_tokens=5)
    with pytest.raises(EngineBusyError, match="already generating in this thread"):
        next(second)
    with pytest.raises(EngineBusyError):
        engine.logits([1, 2, 3])
    assert list(first)[-1].reason == "length"
    assert answer(engine, "World", 5)  # the engine is free again
    first = engine.generate("Hello", temperature=0, max_tokens=5)
    next(first)
    first.close()  # an abandoned generation gives the engine back
    assert answer(engine, "World", 5)


def test_stop_meant_for_an_earlier_generation_does_not_cancel_the_next(engine):
    engine.stop()
    assert len(answer(engine, "Hello", 6)) == 6


def test_nan_logits_are_an_error_event_not_empty_text(tiny_models):
    """NaN weights (or values that overflow) made every logit NaN: 4 empty tokens, `stop: length`, no Error."""
    eng = hybridmoe.load(tiny_models("deepseek_v3"))
    with torch.no_grad():
        eng.model.layers[2].attn_norm.weight[3] = float("nan")
    for temperature in (0, 0.8):
        events = list(eng.generate("Hello", temperature=temperature, max_tokens=4))
        errors = [e for e in events if isinstance(e, Error)]
        assert len(errors) == 1 and "layers.2.attn_norm.weight holds NaN" in errors[0].message
        assert not [e for e in events if isinstance(e, Text)]
        assert events[-1].reason == "error" and events[-1].completion_tokens == 0


@pytest.mark.parametrize("context", [-5, 0, 2.5, True, "8"])
def test_context_must_be_a_positive_whole_number(tiny_models, context):
    with pytest.raises(ConfigError, match="--ctx"):
        hybridmoe.load(tiny_models("deepseek_v3"), context=context)
