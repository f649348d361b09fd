"""The batch scheduler that the server drives: which sequences decode together in the next step, which prompts are
read next and how much of them, and which KV cache slot each sequence holds. Pure Python, no tensors: the batch
runner (engine/batch.py) turns each Plan into forward calls and reports back what they produced.

A sequence waits in a queue until a slot is free, then reads its prompt in chunks between decode steps (so a long
prompt never stalls the others for more than one chunk), then decodes one token per step alongside every other
sequence that is decoding, each at its own position. A finished or cancelled sequence gives its slot back at once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import count

from ..errors import HybridMoEError

_ids = count(1)


class QueueFull(HybridMoEError):
    """Every slot is busy and the waiting queue is at its limit (the server answers 429)."""


class Phase(StrEnum):
    WAITING = "waiting"  # queued for a cache slot
    PREFILL = "prefill"  # holds a slot; its prompt is being read
    DECODE = "decode"  # one token per step
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    prompt: list[int]
    id: int = field(default_factory=lambda: next(_ids))
    phase: Phase = Phase.WAITING
    slot: int | None = None
    cached: int = 0  # tokens whose keys and values are in the slot; a decode row's token goes to this position
    pending: int | None = None  # the token sampled last, fed at the next decode step

    @property
    def to_read(self) -> int:
        return len(self.prompt) - self.cached


@dataclass(frozen=True, slots=True)
class Chunk:
    """`tokens` of `seq`'s prompt, to be written from position `start`."""
    seq: Sequence
    start: int
    tokens: list[int]

    @property
    def last(self) -> bool:
        """Whether this chunk ends the prompt (its logits give the first token)."""
        return self.start + len(self.tokens) == len(self.seq.prompt)


@dataclass(frozen=True, slots=True)
class Plan:
    decode: list[Sequence]  # one token each (seq.pending at position seq.cached), in one forward call
    prefill: list[Chunk]  # prompt chunks, as the rows of one forward call

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_seqs: int = 4  # sequences holding a cache slot (decoded together)
    max_queue: int = 64  # sequences waiting for a slot; past it, add() raises QueueFull
    prefill_tokens: int = 512  # prompt tokens read per step, padding included (rows are padded to the longest)

    def __post_init__(self):
        for name, low in (("max_seqs", 1), ("max_queue", 0), ("prefill_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, not {value!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # holding a slot, in order of admission
        self.free_slots = list(range(self.config.max_seqs - 1, -1, -1))  # popped from the end: slot 0 first

    def add(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise ValueError("the prompt is empty")
        if len(self.waiting) - len(self.free_slots) >= self.config.max_queue:  # (the free slots take some soon)
            raise QueueFull(f"all {self.config.max_seqs} sequence slots are busy and {len(self.waiting)} "
                            f"requests wait for one (the queue's limit); try again later")
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def plan(self) -> Plan:
        """The next step's work: every decoding sequence, then prompt chunks up to the prefill budget."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.phase = self.free_slots.pop(), Phase.PREFILL
            self.running.append(seq)
        decode = [s for s in self.running if s.phase == Phase.DECODE]
        chunks: list[Chunk] = []
        budget, width = self.config.prefill_tokens, 0  # rows are padded to the widest chunk
        for seq in self.running:
            if seq.phase != Phase.PREFILL:
                continue
            n = min(seq.to_read, budget // (len(chunks) + 1))
            if n < 1 or (chunks and max(width, n) * (len(chunks) + 1) > budget):
                break
            width = max(width, n)
            chunks.append(Chunk(seq, seq.cached, seq.prompt[seq.cached:seq.cached + n]))
        return Plan(decode, chunks)

    def advance(self, seq: Sequence, written: int, token: int | None) -> None:
        """After a step: `written` more tokens of seq are in its slot; `token` is the one sampled from the step's
        logits (None while the prompt is still being read)."""
        seq.cached += written
        if token is not None:
            seq.pending, seq.phase = token, Phase.DECODE

    def finish(self, seq: Sequence) -> None:
        """seq leaves the batch (finished, cancelled or failed); its slot is free for the next step."""
        if seq.phase == Phase.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        seq.phase, seq.slot = Phase.FINISHED, None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
