"""Streamed prefill: a chunk's routed experts cross to the GPU one MoE layer at a time, in a few large copies, and
run as one grouped call per buffer of the layer (OffloadExperts._start_streamed decides; this file moves bytes).

Per MoE layer of a prefill chunk:
1. The tokens are sorted by expert on the device and only the count per expert comes to the host (the layer's one
   host sync). Experts in the stage's cache run from their slots; the others the chunk uses were copied ahead (5.),
   or the cost model splits them: the CPU takes the few-token ones and computes them while the GPU works, the rest
   cross PCIe now.
2. Copies land in one of two staging buffers (each a layer's experts where VRAM allows, else fewer rows, and the
   layer goes in several batches). Experts are packed into rows in ascending order, so a run of consecutive experts
   is one copy from the pinned tier's [E, nbytes] rows; the mmap tier's runs are gathered from the file's pages into
   pinned bounce pieces and sent from there. A copy into a buffer waits (on the copy stream) for the last compute
   that read it; the compute waits for the copy.
3. One grouped call (QuantStore.compute_slots_prefill) over the cached experts' slots and one over each buffer's
   rows: no launch and no Python per expert on the GPU side once experts have more than a few tokens each (with
   fewer, the GEMV kernels run per expert: they read the raw weights once instead of writing a bf16 copy).
   Experts that the cache admits are copied from the staging rows into their slots on the device (one
   gather-scatter), not again over PCIe.
4. Outputs land in their fixed [token, k] positions and are combined in a fixed order, as everywhere in the
   offload engine: results do not depend on what was cached, copied ahead, or computed by the CPU.
5. When the chunk used most of the layer's uncached experts, the next MoE layer's uncached experts are copied into
   the other buffer before its routing is known, so that copy runs while this layer computes; all but the share the
   cost model gave the CPU at this layer (the last experts), which the CPU may take at the next layer if they are
   used. An expert copied ahead costs nothing more to compute on the GPU, so it is not given to the CPU.
6. With several GPUs each streams a share of every streamed layer's copies over its own link (expert parallel) and
   computes it on its own device; the rows of x go there and the outputs come back to the layer's device.

Letters: N tokens, K experts per token, E experts of the layer, D hidden.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..layers.moe import to_device

AHEAD_USED = 0.75  # copy the next layer ahead when a chunk used at least this share of a layer's uncached experts
BOUNCE_BYTES = 64 << 20  # one of the mmap tier's pinned bounce pieces (at least one expert row)
N_BOUNCE = 3


def runs(experts: list[int]) -> list[tuple[int, int, int]]:
    """Ascending experts packed into rows 0, 1, ... -> (first row, first expert, count) per run of consecutive
    experts; each run is one copy."""
    out: list[list[int]] = []
    for row, e in enumerate(experts):
        if out and out[-1][1] + out[-1][2] == e:
            out[-1][2] += 1
        else:
            out.append([row, e, 1])
    return [(r, e, n) for r, e, n in out]


class Bounce:
    """Pinned host pieces that the mmap tier's rows pass through to the device: the CPU fills one piece from the
    file's pages while the copy out of the previous one runs. Allocated on first use."""

    def __init__(self, piece_bytes: int, n: int = N_BOUNCE, pin: bool = True):
        self.piece_bytes, self.n, self.pin = piece_bytes, n, pin
        self.pieces: list[torch.Tensor] = []
        self.sent: list = [None] * n  # CUDA event: the last copy out of each piece
        self.next = 0

    def send(self, dst: torch.Tensor, fill: Callable[[torch.Tensor, int], None]) -> None:
        """dst [n, row] contiguous (on the device, copied on the current stream); fill(out [m, row] on the host, a)
        writes rows a .. a + m - 1 of it."""
        if not self.pieces:
            self.pieces = [torch.empty(self.piece_bytes, dtype=torch.uint8, pin_memory=self.pin)
                           for _ in range(self.n)]
        n, row = dst.shape
        per = max(1, self.piece_bytes // row)
        for a in range(0, n, per):
            m = min(per, n - a)
            j = self.next
            self.next = (j + 1) % self.n
            if self.sent[j] is not None:
                self.sent[j].synchronize()  # host wait: the piece's previous copy has left it
            host = self.pieces[j][:m * row].view(m, row)
            fill(host, a)
            dst[a:a + m].copy_(host, non_blocking=True)
            if dst.device.type == "cuda":
                self.sent[j] = torch.cuda.Event()
                self.sent[j].record()


@dataclass(slots=True)
class Load:
    """What a staging buffer holds (or is receiving): experts of one layer, expert -> row."""
    layer: int
    rows: dict[int, int]


@dataclass(slots=True)
class Streamed:
    """A layer's queued work: parts [N*K, D] (every GPU expert's rows in place once the queue has run), the
    positions sorted by (group, expert), and what the CPU still has to fill in (its experts' rows of x, on the
    host, in the same order)."""
    parts: torch.Tensor
    order: torch.Tensor
    n_gpu: int  # the first n_gpu positions of `order` are the GPU's
    x_cpu: torch.Tensor | None
    nbytes: int

    def put_cpu(self, ys: torch.Tensor) -> None:
        """The CPU experts' outputs [rows, D] (host), in x_cpu's order, to their positions: one copy to the device
        that does not wait for the queue."""
        self.parts[self.order[self.n_gpu:]] = to_device(ys, self.parts.device)


class LayerStream:
    """One device's double-buffered staging for streamed prefill: two buffers of `rows` expert rows, what each
    holds, the events that order a copy into a buffer after the compute that last read it (and the compute after the
    copy), and the mmap tier's bounce pieces."""

    def __init__(self, store, device: torch.device, rows: int, copy_stream=None):
        if rows < 1:
            raise ValueError("a staging buffer needs at least one row")
        self.store, self.device, self.rows, self.copy_stream = store, device, rows, copy_stream
        self.buffers = [store.new_staging(rows, device) for _ in range(2)]
        self.loads: list[Load | None] = [None, None]
        self.copied: list = [None, None]  # CUDA event: the copy into each buffer is done
        self.free: list = [None, None]  # CUDA event: the last compute that read each buffer is done
        self.next = 0
        self.bounce = Bounce(max(BOUNCE_BYTES, store.slot_nbytes()), pin=device.type == "cuda")
        # compute_slots_prefill's `grouped`: None lets it choose (on CUDA, grouped calls once an expert has more
        # tokens than the GEMV kernels take, which read few tokens' weights once; on the CPU standing in, each
        # expert with the CPU kernels); a test sets True to run the grouped calls under Triton's interpreter.
        self.grouped: bool | None = None

    def grouped_kw(self) -> dict:
        return {} if self.grouped is None else {"grouped": self.grouped}

    def held(self, layer: int) -> dict[int, int]:
        """Experts of `layer` already in a buffer (copied ahead, or still there from the last chunk) -> buffer."""
        return {e: j for j, got in enumerate(self.loads) if got is not None and got.layer == layer for e in got.rows}

    def load(self, layer: int, experts: list[int]) -> tuple[int, int]:
        """Copy these experts of `layer` (ascending, at most `rows`) into the next buffer -> (buffer, bytes). On
        CUDA the copies go on the copy stream after the last compute that read the buffer; nothing blocks the host
        (except the mmap tier's bounce pieces, which the host fills)."""
        if len(experts) > self.rows:
            raise ValueError(f"{len(experts)} experts for a staging buffer of {self.rows} rows")
        j = self.next
        self.next = 1 - j
        self.loads[j] = Load(layer, {e: r for r, e in enumerate(experts)})
        if self.copy_stream is None:
            return j, self._copy(j, layer, experts)
        if self.free[j] is not None:
            self.copy_stream.wait_event(self.free[j])
        with torch.cuda.stream(self.copy_stream):
            nbytes = self._copy(j, layer, experts)
            self.copied[j] = torch.cuda.Event()
            self.copied[j].record(self.copy_stream)
        return j, nbytes

    def _copy(self, j: int, layer: int, experts: list[int]) -> int:
        return sum(self.store.copy_experts(self.buffers[j], row, layer, first, n, self.bounce)
                   for row, first, n in runs(experts))

    def wait(self, j: int) -> None:
        """Compute queued from now on reads buffer j after its copy has landed."""
        if self.copied[j] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[j])

    def release(self, j: int) -> None:
        """The compute that reads buffer j has been queued: a later copy into it waits for that compute."""
        if self.copy_stream is not None:
            self.free[j] = torch.cuda.Event()
            self.free[j].record(torch.cuda.current_stream(self.device))

    def run(self, layer: int, j: int, experts: list[int], x: torch.Tensor, counts: list[int],
            admit: dict[int, int] | None = None, slots=None) -> tuple[torch.Tensor, int]:
        """These experts of `layer` on their rows of x (counts[g] rows for experts[g], on this device): from buffer
        j, or copied into the next buffer first (j = -1); the ones in `admit` also go to their cache slots in
        `slots` -> (outputs, bytes copied)."""
        nbytes = 0
        if j < 0:
            j, nbytes = self.load(layer, experts)
        self.wait(j)
        rows = self.loads[j].rows
        self._admit(slots, j, layer, [e for e in experts if admit and e in admit], admit)
        y = self.store.compute_slots_prefill(self.store.staged(self.buffers[j], layer), [rows[e] for e in experts],
                                             layer, x, counts, **self.grouped_kw())
        self.release(j)
        return y, nbytes

    def _admit(self, slots, j: int, layer: int, experts: list[int], admit: dict[int, int]) -> None:
        """Staged experts that the cache admits: from buffer j's rows into their slots, on the device."""
        if not experts:
            return
        rows = self.loads[j].rows
        index = to_device(torch.tensor([admit[e] for e in experts] + [rows[e] for e in experts]), self.device)
        self.store.copy_staged_to_slots(slots, index[:len(experts)], self.buffers[j], index[len(experts):], layer)

    def ahead(self, layer: int, experts: list[int]) -> tuple[list[int], int]:
        """Copy the first `rows` of these experts of the next layer (ascending) before its routing is known, unless
        a buffer holds them already -> (experts copied, bytes)."""
        experts = experts[:self.rows]
        if not experts or set(experts) <= set(self.held(layer)):
            return [], 0
        return experts, self.load(layer, experts)[1]


def held_by(streams: list[LayerStream], layer: int) -> dict[int, tuple[int, int]]:
    """Experts of `layer` already in a staging buffer of one of these streams -> (stream index, buffer); the first
    stream holding one wins."""
    out: dict[int, tuple[int, int]] = {}
    for i, stream in enumerate(streams):
        for e, j in stream.held(layer).items():
            out.setdefault(e, (i, j))
    return out


def shares(experts: list[int], n: int) -> list[list[int]]:
    """Ascending experts cut into n contiguous shares of nearly equal size (runs stay runs), the first ones larger."""
    size, extra = divmod(len(experts), n)
    out, a = [], 0
    for i in range(n):
        b = a + size + (i < extra)
        out.append(experts[a:b])
        a = b
    return out


def _on(device: torch.device):
    """Make `device` current (Triton launches on the current device); a no-op on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def prefill_layer(streams: list[LayerStream], layer: int, x: torch.Tensor, ids: torch.Tensor, counts: list[int],
                  cached: dict[int, int], slots, copy: list[list[int]], on_cpu: list[int],
                  admit: dict[int, int]) -> Streamed:
    """Queue a layer's GPU work. streams[0] is the layer's device's; the others (other GPUs) each compute a share
    of the experts on their own device, their rows of x sent there and their outputs back (expert parallel).
    counts: tokens per expert (all E); cached: expert -> cache slot in `slots` (the layer's device); copy[i]: the
    experts stream i copies now (ascending); on_cpu: experts the CPU computes (ascending; their rows of x come to the
    host now); admit: experts of streams[0] the cache takes, expert -> slot. The experts used that are neither
    cached, copied nor the CPU's are held in a stream's staging (copied ahead)."""
    N, K = ids.shape
    E = len(counts)
    held = held_by(streams, layer)
    # GPU groups in the order their rows are sorted: the cached experts' slots; then per stream each buffer that
    # holds experts copied ahead, and the batches copied now (each group's experts ascending).
    groups: list[tuple[int, int | None, list[int]]] = []  # (stream, buffer: None for the cache, -1 to copy now)
    if cached:
        groups.append((0, None, sorted(cached)))
    for i, stream in enumerate(streams):
        for j in (0, 1):
            mine = [e for e in sorted(held) if held[e] == (i, j) and counts[e] and e not in cached]
            if mine:
                groups.append((i, j, mine))
        groups += [(i, -1, copy[i][a:a + stream.rows]) for a in range(0, len(copy[i]), stream.rows)]
    label = [len(groups) + 1] * E  # unused experts: no positions
    for g, (_, _, es) in enumerate(groups):
        for e in es:
            label[e] = g
    for e in on_cpu:
        label[e] = len(groups)
    # one stable sort: positions grouped by (group, expert), ascending within an expert
    key = to_device(torch.tensor([label[e] * E + e for e in range(E)]), x.device)
    order = torch.argsort(key[ids.flatten()], stable=True)
    n_gpu = N * K - sum(counts[e] for e in on_cpu)
    x_cpu = x[order[n_gpu:] // K].to("cpu") if on_cpu else None  # waits for the sort only: nothing else queued
    xs = x[order[:n_gpu] // K]  # [n_gpu, D]
    store = streams[0].store
    ys, row, nbytes = [], 0, 0
    for i, j, es in groups:
        n_tok = [counts[e] for e in es]
        xg = xs[row:row + sum(n_tok)]
        row += sum(n_tok)
        if j is None:
            ys.append(store.compute_slots_prefill(slots, [cached[e] for e in es], layer, xg, n_tok,
                                                  **streams[0].grouped_kw()))
            continue
        stream = streams[i]
        with _on(stream.device):  # another GPU's share: rows there, outputs back (ordered with both queues)
            y, n = stream.run(layer, j, es, xg.to(stream.device, non_blocking=True), n_tok,
                              admit if i == 0 else None, slots)
        ys.append(y.to(x.device, non_blocking=True))
        nbytes += n
    parts = x.new_empty(N * K, x.shape[-1])
    if ys:
        parts[order[:n_gpu]] = torch.cat(ys) if len(ys) > 1 else ys[0]
    return Streamed(parts, order, n_gpu, x_cpu, nbytes)
