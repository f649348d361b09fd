"""The event stream: chat template, reasoning channel, stop strings, context limits, cancellation."""
import threading

import pytest

import hybridmoe
from hybridmoe import Done, Error, Stats, Text


@pytest.fixture(scope="module")
def engine(tiny_models):
    return hybridmoe.load(tiny_models("deepseek_v3"))


def collect(events):
    events = list(events)
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    return events


def test_text_events_concatenate_to_the_decoded_completion(engine):
    events = collect(engine.generate("The quick brown", temperature=0, max_tokens=20, ignore_eos=True))
    done = events[-1]
    text = "".join(e.text for e in events if isinstance(e, Text))
    assert text == done.text == engine.tokenizer.decode(list(done.token_ids))
    assert done.reason == "length" and done.completion_tokens == 20
    stats = [e for e in events if isinstance(e, Stats)]
    assert stats[0].phase == "prefill" and stats[-1].step == 20
    assert stats[-1].extra["expert_tokens"]  # the MoE layers report which experts ran


def test_chat_uses_the_template(engine):
    ids, text = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    assert text == "<|begin|><|user|>Hello<|end|><|assistant|>"
    assert ids[0] == engine.tokenizer.bos_id
    events = collect(engine.chat([{"role": "user", "content": "Hello"}], temperature=0, max_tokens=5))
    assert events[-1].prompt_tokens == len(ids)


def test_r1_style_template_starts_in_reasoning(tiny_models, tmp_path):
    import shutil

    import tiny
    d = tmp_path / "r1"
    shutil.copytree(tiny_models("deepseek_v3"), d)
    tiny.write_tokenizer(d, tiny.R1_TEMPLATE)
    eng = hybridmoe.load(d)
    events = collect(eng.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=8, ignore_eos=True))
    texts = [e for e in events if isinstance(e, Text)]
    assert texts and texts[0].channel == "reasoning"


def test_stop_string_ends_generation(engine):
    first = collect(engine.generate("Hello", temperature=0, max_tokens=30, ignore_eos=True))[-1].text
    assert len(first) > 4
    stop = first[2:4]
    done = collect(engine.generate("Hello", temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,)))[-1]
    assert done.reason == "stop" and done.text == first[:first.index(stop)]


def test_prompt_longer_than_context_is_an_error_event(tiny_models):
    eng = hybridmoe.load(tiny_models("deepseek_v3"), context=16)
    events = collect(eng.generate(list(range(10, 40)), max_tokens=4))
    assert isinstance(events[0], Error) and "context" in events[0].message
    assert events[-1].reason == "context"


def test_generation_stops_at_context_end(tiny_models):
    eng = hybridmoe.load(tiny_models("deepseek_v3"), context=16)
    done = collect(eng.generate(list(range(10, 20)), temperature=0, max_tokens=100, ignore_eos=True))[-1]
    assert done.reason == "context" and done.prompt_tokens + done.completion_tokens <= 17


def test_stop_from_another_thread_cancels(engine):
    events = []
    for ev in engine.generate("Hello", temperature=0, max_tokens=200, ignore_eos=True):
        events.append(ev)
        if isinstance(ev, Stats) and ev.step == 3:
            threading.Thread(target=engine.stop).start()
            threading.Event().wait(0.05)
    assert events[-1].reason == "cancelled" and events[-1].completion_tokens < 200


def test_seeded_sampling_is_reproducible(engine):
    a = collect(engine.generate("Hello", temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))[-1]
    b = collect(engine.generate("Hello", temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))[-1]
    assert a.token_ids == b.token_ids
