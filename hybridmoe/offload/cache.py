"""The GPU expert-slot allocator and its eviction policy. Pure Python: it never touches tensors.

Policy: LFU with exponential decay. A key's score is its use count decayed by `decay` per step since each use.
Because every score decays by the same factor per step, the order of two keys never changes while neither is used,
so a key's priority can be stored once as log(score at last use) + last_use * -log(decay) and kept in a heap.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

Key = tuple[int, int]  # (layer, expert)


@dataclass(slots=True)
class _Entry:
    freq: float = 0.0  # decayed use count as of `last`
    last: int = 0


@dataclass(slots=True)
class SlotCache:
    n_slots: int
    decay: float = 0.95
    step: int = 0
    slot_of: dict[Key, int] = field(default_factory=dict)
    key_in: list[Key | None] = field(default_factory=list)
    pinned: dict[Key, int] = field(default_factory=dict)
    _uses: dict[Key, _Entry] = field(default_factory=dict)
    _heap: list[tuple[float, int, Key]] = field(default_factory=list)
    _version: int = 0
    _free: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.n_slots < 0:
            raise ValueError("n_slots must be >= 0")
        if not 0 < self.decay <= 1:
            raise ValueError("decay must be in (0, 1]")
        self.key_in = [None] * self.n_slots
        self._free = list(range(self.n_slots - 1, -1, -1))

    def tick(self) -> None:
        """One decode step (or prefill chunk) has passed."""
        self.step += 1

    def score(self, key: Key) -> float:
        e = self._uses.get(key)
        return 0.0 if e is None else e.freq * self.decay ** (self.step - e.last)

    def _priority(self, key: Key) -> float:
        e = self._uses[key]
        lam = -math.log(self.decay) if self.decay < 1 else 0.0
        return math.log(max(e.freq, 1e-30)) + e.last * lam

    def touch(self, key: Key, n: int = 1) -> None:
        """Record a use of an expert, cached or not (misses inform admission)."""
        e = self._uses.setdefault(key, _Entry(0.0, self.step))
        e.freq = e.freq * self.decay ** (self.step - e.last) + n
        e.last = self.step
        if key in self.slot_of:
            self._push(key)

    def _push(self, key: Key) -> None:
        self._version += 1
        heapq.heappush(self._heap, (self._priority(key), self._version, key))

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def pin(self, key: Key) -> None:
        self.pinned[key] = self.pinned.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self.pinned.get(key, 0) - 1
        if n <= 0:
            self.pinned.pop(key, None)
        else:
            self.pinned[key] = n

    def _victim(self) -> Key | None:
        """Lowest-priority cached, unpinned key (stale heap entries are dropped on the way)."""
        skipped = []
        found = None
        while self._heap:
            prio, ver, key = heapq.heappop(self._heap)
            if key not in self.slot_of or abs(prio - self._priority(key)) > 1e-9:
                continue  # stale: evicted or used since this entry was pushed
            if key in self.pinned:
                skipped.append((prio, ver, key))
                continue
            found = key
            skipped.append((prio, ver, key))  # stays valid until the caller evicts it
            break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found

    def would_admit(self, key: Key, min_score: float = 0.0) -> bool:
        """A free slot, or a victim that is colder than `key`; and `key` scores at least min_score."""
        if key in self.slot_of or self.n_slots == 0 or self.score(key) < min_score:
            return False
        if self._free:
            return True
        victim = self._victim()
        return victim is not None and self.score(victim) < self.score(key)

    def admit(self, key: Key, force: bool = False) -> tuple[int, Key | None] | None:
        """Give `key` a slot: (slot, evicted key or None), or None if every slot is pinned (or, unless force,
        every cached key is hotter)."""
        if key in self.slot_of:
            return self.slot_of[key], None
        if self.n_slots == 0:
            return None
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = self._victim()
            if victim is None or (not force and self.score(victim) >= self.score(key)):
                return None
            slot = self.slot_of.pop(victim)
            evicted = victim
        self.slot_of[key] = slot
        self.key_in[slot] = key
        self._uses.setdefault(key, _Entry(0.0, self.step))
        self._push(key)
        return slot, evicted

    def __len__(self) -> int:
        return len(self.slot_of)
