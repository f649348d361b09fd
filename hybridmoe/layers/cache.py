"""The layout of one forward call and the per-layer caches it writes into.

A forward call takes B rows, right-padded to T new tokens. Row b continues the sequence held in cache slot
`slots[b]`, which already holds `start[b]` tokens, and brings `n_new[b]` valid tokens. These are host-side
integers that the engine knows already, so building the call needs no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Batch:
    start: list[int]
    n_new: list[int]
    slots: list[int] | None  # None: no cache, each row is a whole sequence starting at position 0
    positions: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, 1, T, L] bool, True where a query may attend to a key
    slot_index: torch.Tensor | None = None  # [B] long, slots as a tensor for gathers
    # Graph-captured decode (one row, one token): the position lives on the device and the cache is written
    # there; the mask spans a fixed number of keys, so the same captured kernels serve every step.
    write_at: torch.Tensor | None = None  # [1] long

    @staticmethod
    def make(start: list[int], n_new: list[int], slots: list[int] | None, device) -> "Batch":
        if len(start) != len(n_new) or (slots is not None and len(slots) != len(start)):
            raise ValueError("start, n_new and slots must have one entry per row")
        if min(n_new) < 1:
            raise ValueError("every row needs at least one new token")
        T = max(n_new)
        if len(start) == 1 and T == 1 and slots is not None:  # one decode step: its token sees every key
            positions = torch.full((1, 1), start[0], device=device)
            mask = torch.ones(1, 1, 1, start[0] + 1, dtype=torch.bool, device=device)
            return Batch(list(start), [1], list(slots), positions, mask, torch.tensor(slots, device=device))
        st = torch.tensor(start, device=device)[:, None]
        positions = st + torch.arange(T, device=device)[None, :]  # [B, T]
        L = max(s + n for s, n in zip(start, n_new)) if slots is not None else T
        keys = torch.arange(L, device=device)[None, None, :]  # [1, 1, L]
        end = (st + torch.tensor(n_new, device=device)[:, None])[:, :, None]  # [B, 1, 1]
        # With a cache, key j is the slot's j-th token; without one, it is new token j (start is then 0).
        mask = (keys <= positions[:, :, None]) & (keys < end)  # [B, T, L]
        slot_index = torch.tensor(slots, device=device) if slots is not None else None
        return Batch(list(start), list(n_new), None if slots is None else list(slots), positions, mask[:, None],
                     slot_index)

    @staticmethod
    def decode_static(position: torch.Tensor, n_keys: int, slot: int, mask: torch.Tensor | None = None) -> "Batch":
        """One row, one token at the device position `position` ([1, 1] long), attending to keys 0..position
        of a window of `n_keys`. Built from device tensors only (no host values), so it can be graph-captured.
        `mask`, if given, is that mask already made (e.g. once per step for all layers)."""
        if mask is None:
            keys = torch.arange(n_keys, device=position.device)
            mask = (keys <= position[:, :, None])[:, None]  # [1, 1, 1, n_keys]
        return Batch([0], [1], [slot], position, mask, None, position[0])

    @property
    def sees_all(self) -> bool:
        """One row, one new token that attends to every key (a decode step with its whole history as keys)."""
        return len(self.n_new) == 1 and self.n_new[0] == 1 and self.write_at is None

    def one_cpu_token(self, x: torch.Tensor, cache: "LayerCache | None") -> bool:
        """A decode step (`sees_all`) with a cache whose hidden state x is float32, contiguous, on the CPU: what the
        CPU decode blocks take."""
        return (cache is not None and self.sees_all and x.device.type == "cpu" and x.dtype == torch.float32
                and x.is_contiguous())

    def to(self, device) -> "Batch":
        if self.positions.device == torch.device(device):
            return self
        move = (lambda t: None if t is None else t.to(device))
        return Batch(self.start, self.n_new, self.slots, move(self.positions), move(self.mask), move(self.slot_index),
                     move(self.write_at))


class LayerCache:
    """One layer's cache: a few buffers shaped [slots, max_len, ...] (GQA: k and v; MLA: latent and rope key)."""

    def __init__(self, *buffers: torch.Tensor):
        self.buffers = buffers
        self._arrays: dict[int, tuple] = {}  # slot -> its rows of each buffer as numpy arrays (slot_arrays)

    def slot_arrays(self, slot: int) -> tuple:
        """Each buffer's rows of one slot, [max_len, ...], as numpy arrays sharing the buffers' memory (CPU buffers);
        made once per slot, as every CPU decode step asks every layer for them."""
        got = self._arrays.get(slot)
        if got is None:
            got = self._arrays[slot] = tuple(buf[slot].numpy() for buf in self.buffers)
        return got

    def update(self, batch: Batch, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each row's valid new entries [B, T, ...], then return the rows' whole histories [B, L, ...]."""
        L = batch.mask.shape[-1]
        if batch.write_at is not None:  # device position (graph-captured decode)
            s = batch.slots[0]
            for buf, x in zip(self.buffers, new):
                buf[s].index_copy_(0, batch.write_at, x[0])
            return tuple(buf[s:s + 1, :L] for buf in self.buffers)
        for buf, x in zip(self.buffers, new):
            for b, (slot, s, n) in enumerate(zip(batch.slots, batch.start, batch.n_new)):
                buf[slot, s:s + n] = x[b, :n]
        if len(batch.slots) == 1:  # one row: a view of its slot, no gather copy of the whole history
            s = batch.slots[0]
            return tuple(buf[s:s + 1, :L] for buf in self.buffers)
        return tuple(buf[batch.slot_index, :L] for buf in self.buffers)


class KVCache:
    """All layers' caches for `n_slots` sequences of up to `max_len` tokens."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], ...]], n_slots: int, max_len: int,
                 dtype: torch.dtype, devices: list[torch.device]):
        self.n_slots, self.max_len = n_slots, max_len
        self.layers = [LayerCache(*(torch.zeros(n_slots, max_len, *s, dtype=dtype, device=dev) for s in layer))
                       for layer, dev in zip(shapes, devices)]
