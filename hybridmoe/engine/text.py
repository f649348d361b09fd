"""Streaming text filters: stop strings, and splitting <think>...</think> reasoning from the answer."""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a needle (it may complete later)."""
    best = 0
    for n in needles:
        for k in range(min(len(n) - 1, len(text)), best, -1):
            if text.endswith(n[:k]):
                best = k
                break
    return best


class StopFilter:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.buf = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = _partial_suffix(self.buf, self.stops) if self.stops else 0
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ThinkSplitter:
    """Labels text as "reasoning" or "answer". R1's template opens <think> itself, so a stream can start inside."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self.buf = ""

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while True:
            tag = CLOSE if self.in_think else OPEN
            i = self.buf.find(tag)
            if i < 0:
                break
            if i:
                out.append((self.buf[:i], self.channel))
            self.buf = self.buf[i + len(tag):]
            self.in_think = not self.in_think
        keep = _partial_suffix(self.buf, (CLOSE if self.in_think else OPEN,))
        if len(self.buf) > keep:
            out.append((self.buf[:len(self.buf) - keep], self.channel))
            self.buf = self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> list[tuple[str, str]]:
        out, self.buf = ([(self.buf, self.channel)] if self.buf else []), ""
        return out

    @property
    def channel(self) -> str:
        return "reasoning" if self.in_think else "answer"


def prompt_opens_think(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an open <think> block (DeepSeek-R1's template does this)."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)
