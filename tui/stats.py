"""What the monitor shows, accumulated from the engine's Stats events. Plain Python, so it is tested without a
terminal. Offload counters are optional: whatever the engine does not report stays None and reads "n/a"."""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from hybridmoe import Stats

HISTORY = 120  # decode steps kept for the sparkline
SMOOTH = 0.3  # weight of the newest step in the sparkline's moving average
H2D_WINDOW = 16  # steps averaged for the copy rate, so one slow step does not make the number jump


def total(value) -> float:
    """A counter may be one number or per layer ({layer: n}); the monitor shows the sum."""
    return float(sum(value.values())) if isinstance(value, Mapping) else float(value)


def mean(value) -> float:
    return float(sum(value.values()) / max(len(value), 1)) if isinstance(value, Mapping) else float(value)


class MonitorState:
    def __init__(self):
        self.decode_rates: deque[float] = deque(maxlen=HISTORY)  # per step, smoothed; the engine's is cumulative
        self.prefill_rates: deque[float] = deque(maxlen=HISTORY)  # one per answer
        self.prefill_tok_s: float | None = None
        self.decode_tok_s: float | None = None
        self.prompt_tokens = 0
        self.step = 0
        self.hits = self.misses = 0.0
        self.cache_seen = False
        self.recall: float | None = None
        self.copies: deque[tuple[float, float]] = deque(maxlen=H2D_WINDOW)  # (bytes, seconds) per step
        self.disk: deque[tuple[float, float]] = deque(maxlen=H2D_WINDOW)  # read from disk: (bytes, seconds) per step
        self.from_memory = self.experts_seen = 0  # experts served from RAM, of all served (the disk tier's)
        self.heat: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens routed, since the last reset
        self._last_elapsed = 0.0

    def reset_heat(self) -> None:
        self.heat.clear()

    def push(self, st: Stats) -> None:
        dt = st.elapsed_s - self._last_elapsed if st.phase == "decode" else st.elapsed_s
        self._last_elapsed = st.elapsed_s
        self.prompt_tokens, self.step = st.prompt_tokens, st.step
        if st.phase == "prefill":
            self.prefill_tok_s, self.decode_tok_s = st.prefill_tok_s, None
            self.prefill_rates.append(st.prefill_tok_s)
        else:
            self.decode_tok_s = st.decode_tok_s
            if st.step > 1:  # step 1 comes right after prefill, with no forward pass in between: no rate yet
                now = 1.0 / max(dt, 1e-9)
                last = self.decode_rates[-1] if self.decode_rates and st.step > 2 else now
                self.decode_rates.append(SMOOTH * now + (1 - SMOOTH) * last)
        extra = st.extra or {}
        for layer, experts in (extra.get("expert_tokens") or {}).items():
            row = self.heat.setdefault(int(layer), {})
            for e, n in experts.items():
                row[int(e)] = row.get(int(e), 0) + int(n)
        if "cache_hits" in extra or "cache_misses" in extra:
            self.cache_seen = True
            self.hits += total(extra.get("cache_hits", 0))
            self.misses += total(extra.get("cache_misses", 0))
        if "prefetch_recall" in extra:
            self.recall = mean(extra["prefetch_recall"])
        if "bytes_copied" in extra:
            self.copies.append((total(extra["bytes_copied"]), max(dt, 1e-9)))
        if "disk_bytes" in extra:
            self.disk.append((float(extra["disk_bytes"]), max(dt, 1e-9)))
            self.from_memory += extra.get("experts_in_memory", 0)
            self.experts_seen += sum(extra.get(k, 0) for k in ("experts_in_memory", "experts_read_ahead",
                                                                "experts_waited"))

    @property
    def hit_rate(self) -> float | None:
        seen = self.hits + self.misses
        return self.hits / seen if self.cache_seen and seen else None

    @property
    def h2d_gb_s(self) -> float | None:
        """Bytes copied to the GPU per second of generation, over the last few steps."""
        if not self.copies:
            return None
        return sum(b for b, _ in self.copies) / sum(t for _, t in self.copies) / 1e9

    @property
    def disk_gb_s(self) -> float | None:
        """Bytes read from disk per second of generation, over the last few steps (a model larger than RAM)."""
        if not self.disk:
            return None
        return sum(b for b, _ in self.disk) / sum(t for _, t in self.disk) / 1e9

    @property
    def memory_share(self) -> float | None:
        """Of the experts served so far, the share that was in RAM (not read from disk)."""
        return self.from_memory / self.experts_seen if self.experts_seen else None
