"""The generate loop reads a prompt in chunks: the result is that of one pass, a long prompt reports its progress
between chunks, and a stop request ends it at the next chunk boundary."""
import pytest
import torch

import hybridmoe
from hybridmoe import Done, Progress, Stats
from hybridmoe.engine import generate

IDS = list(range(20, 60))


def last_prefill_logits(eng, ids: list[int], chunk: int) -> torch.Tensor:
    """The logits after the prompt, read in chunks of `chunk` tokens with the KV cache, as the generate loop
    reads it."""
    from hybridmoe.layers.cache import Batch
    cache = eng.model.new_cache(1, 256)
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            logits = eng.model(torch.tensor([part]), Batch.make([s], [len(part)], [0], eng.device), cache,
                               last_only=True)
    return logits[0]


@pytest.mark.parametrize("offload", [False, True])
def test_a_prompt_in_chunks_gives_the_one_pass_result(tiny_models, offload):
    """In chunks of 7 or in one chunk: the last position's logits agree to float32 rounding (attention over the
    cached keys sums in another order) and greedy generation is the same. With offload, the CPU standing in for
    the GPU streams each chunk's experts (offload.stream)."""
    path = tiny_models("qwen3_moe")
    eng = hybridmoe.load(path, accelerator="cpu", expert_cache_slots=3) if offload else hybridmoe.load(path)
    if offload:
        for dev in eng.model.experts.experts.stages:
            dev.grouped_prefill = True
    one = eng.logits(IDS)[-1]
    chunked = last_prefill_logits(eng, IDS, 7)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-5)
    runs = []
    for chunk in (7, 64):
        eng.prefill_chunk = chunk
        runs.append(list(eng.generate(IDS, temperature=0, max_tokens=12, ignore_eos=True))[-1].token_ids)
    assert runs[0] == runs[1]


@pytest.fixture
def chunked_engine(tiny_models, monkeypatch):
    monkeypatch.setattr(generate, "PROGRESS_AFTER_S", 0.0)
    eng = hybridmoe.load(tiny_models("deepseek_v3"))
    eng.prefill_chunk = 8
    forwards = []
    eng.model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[1]))
    return eng, forwards


def test_a_long_prompt_reports_its_progress_between_chunks(chunked_engine):
    eng, forwards = chunked_engine
    events = list(eng.generate(IDS[:30], temperature=0, max_tokens=2, ignore_eos=True))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(p.done, p.total) for p in progress] == [(8, 30), (16, 30), (24, 30)]
    assert all(p.elapsed_s > 0 for p in progress)
    first_stats = next(i for i, e in enumerate(events) if isinstance(e, Stats))
    assert all(isinstance(e, Progress) for e in events[:first_stats])  # then the prefill's Stats
    assert forwards[:4] == [8, 8, 8, 6]


def test_progress_waits_for_its_threshold(chunked_engine, monkeypatch):
    eng, _ = chunked_engine
    monkeypatch.setattr(generate, "PROGRESS_AFTER_S", 3600.0)  # a prompt read faster than that shows nothing
    events = list(eng.generate(IDS[:30], temperature=0, max_tokens=2, ignore_eos=True))
    assert not any(isinstance(e, Progress) for e in events) and events[-1].reason == "length"


def test_stop_during_the_prompt_ends_at_the_next_chunk(chunked_engine):
    eng, forwards = chunked_engine
    events = []
    for ev in eng.generate(IDS[:30], temperature=0, max_tokens=20, ignore_eos=True):
        events.append(ev)
        if isinstance(ev, Progress):
            eng.stop()  # as the UI's Esc or the first Ctrl-C does
    assert [type(e) for e in events] == [Progress, Done]
    done = events[-1]
    assert done.reason == "cancelled" and done.completion_tokens == 0 and done.prompt_tokens == 30
    assert forwards == [8]  # no chunk after the stop, no decode step
    # the engine is usable afterwards, from the start of a new prompt
    again = list(eng.generate(IDS[:30], temperature=0, max_tokens=3, ignore_eos=True))[-1]
    assert again.reason == "length" and again.completion_tokens == 3
