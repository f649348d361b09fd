"""What generate() yields. The TUI, the REPL, the CLI and benchmarks all consume the same stream."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of generated text. channel is "reasoning" inside <think>...</think>, otherwise "answer"."""
    text: str
    channel: str = "answer"
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Stats:
    """Per-step statistics. `extra` carries engine-specific counters (cache hits, bytes copied, ...)."""
    phase: str  # "prefill" or "decode"
    step: int  # tokens generated so far
    prompt_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    elapsed_s: float
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    """The prompt is being read: `done` of `total` tokens after `elapsed_s`. Yielded after each prefill chunk but
    the last, once reading has taken more than about a second (a Stats event with phase "prefill" ends it)."""
    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user should know that did not stop generation (e.g. the expert cache was shrunk)."""
    message: str


@dataclass(frozen=True, slots=True)
class Error:
    """A problem that ended generation; message is one line meant for the user."""
    message: str


@dataclass(frozen=True, slots=True)
class Done:
    """Always the last event. reason: "eos", "stop" (a stop string), "length", "context", "cancelled" or "error"."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion, reasoning included, stop string excluded
    token_ids: tuple[int, ...] = ()  # every generated token, in order


Event = Text | Stats | Progress | Notice | Error | Done
