"""The batch scheduler on its own (pure Python): slots, the queue and its limit, prompt chunks within the budget."""
import pytest

from hybridmoe.engine.scheduler import Phase, QueueFull, Scheduler, SchedulerConfig, Sequence


def test_sequences_wait_for_a_slot_and_take_the_freed_one():
    s = Scheduler(SchedulerConfig(max_seqs=2, max_queue=8, prefill_tokens=64))
    a, b, c = Sequence([1, 2, 3]), Sequence([4, 5]), Sequence([6])
    for seq in (a, b, c):
        s.add(seq)
    plan = s.plan()
    assert [ch.seq for ch in plan.prefill] == [a, b] and not plan.decode
    assert (a.slot, b.slot, c.phase) == (0, 1, Phase.WAITING)
    for ch in plan.prefill:
        s.advance(ch.seq, len(ch.tokens), 7)
    assert s.plan().decode == [a, b]
    s.finish(a)  # a finished (or cancelled) row leaves at once: its slot goes to the next in the queue
    plan = s.plan()
    assert plan.decode == [b] and [ch.seq for ch in plan.prefill] == [c] and c.slot == 0


def test_a_long_prompt_is_read_in_chunks_between_decode_steps():
    s = Scheduler(SchedulerConfig(max_seqs=2, prefill_tokens=8))
    short, long = Sequence([1, 2]), Sequence(list(range(20)))
    s.add(short)
    s.advance(s.plan().prefill[0].seq, 2, 9)  # decoding now
    s.add(long)
    starts = []
    while long.phase != Phase.DECODE:
        plan = s.plan()
        assert plan.decode == [short]  # every step still decodes the running sequence
        (chunk,) = plan.prefill
        assert len(chunk.tokens) <= 8 and chunk.tokens == long.prompt[chunk.start:chunk.start + len(chunk.tokens)]
        starts.append(chunk.start)
        s.advance(long, len(chunk.tokens), 5 if chunk.last else None)
    assert starts == [0, 8, 16] and long.cached == 20


def test_short_prompts_share_one_prefill_call_within_the_padded_budget():
    s = Scheduler(SchedulerConfig(max_seqs=4, prefill_tokens=12))
    seqs = [Sequence([1] * n) for n in (3, 4, 5, 2)]
    for seq in seqs:
        s.add(seq)
    chunks = s.plan().prefill
    width = max(len(c.tokens) for c in chunks)
    assert len(chunks) >= 2 and width * len(chunks) <= 12


def test_queue_limit():
    s = Scheduler(SchedulerConfig(max_seqs=1, max_queue=1))
    s.add(Sequence([1]))
    s.plan()  # takes the only slot
    s.add(Sequence([2]))
    with pytest.raises(QueueFull):
        s.add(Sequence([3]))
    with pytest.raises(ValueError):
        s.add(Sequence([]))


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_seqs"):
        SchedulerConfig(max_seqs=0)
