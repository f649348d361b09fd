"""OffloadExperts: the Experts implementation of the offload engine.

Per MoE layer and step: one host sync brings the chosen expert ids to the host. Experts already in a GPU slot of the
layer's device run there; the others run on the CPU (the hidden state goes to the host, a few KB at decode) or are
copied into a slot and computed there. At decode the cost model's `place` picks per expert (the CPU, as a rule). At
prefill the CPU and the GPU side (copies, then compute) work at the same time, so its `split` gives the CPU the
few-token experts until both are predicted to finish about together. The GPU work is queued first, with every
expert's [token, k] positions moved to the device in one copy that does not wait for the queue; the caller queues
the shared expert; then the CPU experts run in the calling thread (numba's kernels are multi-threaded themselves)
while the GPU works through its queue, and their outputs reach the device in one copy. Every expert's output lands
in a fixed [token, k] position and is combined in a fixed order, so results do not depend on where an expert ran,
the cache size, prefetching, or timing.

One-token steps inside the decode graphs (`start_device`) take no host sync: where the CPU computes a layer's
missing experts (8-bit activations, the file's bytes) they run in a host node on the GPU stream, and where a cache
holds part of the layer's experts a slot table on the device says which ones the GPU computes; the cache then
changes only between steps (`_finish_step`), from the ids the step leaves in host buffers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..kernels import cpu as ck
from ..layers.moe import combine, expert_positions, positions_on, to_device
from .cache import SlotCache
from .scheduler import CostModel
from .stream import AHEAD_USED, LayerStream, held_by, prefill_layer, shares


REUSED = 2.0  # decayed use count: an expert used in most of the last few steps
# Copies into the cache that a stage starts per decode step (`_admit_hot`, `_admit_landing`): the CPU computes a missing
# expert sooner than PCIe copies it, so a copy pays only by reuse, and from the mmap tier it holds the host meanwhile
ADMIT_PER_STEP = 4


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    copies: int = 0
    cpu: int = 0
    ahead: int = 0  # hits served from the prefetch ring (counted in hits too)


@dataclass
class StepStats:
    layers: dict[int, LayerCounters] = field(default_factory=dict)
    bytes_copied: int = 0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    expert_tokens: dict[int, dict[int, int]] = field(default_factory=dict)


class DeviceSlots:
    """One device's expert cache: the pure-Python allocator plus the slot buffers it indexes. If the device cannot
    hold `n_slots`, it takes half as many until the allocation succeeds (and says so in `shrunk_from`)."""

    def __init__(self, store, n_slots: int, device: torch.device, decay: float, n_staging: int = 4,
                 n_ahead: int = 0):
        self.device = device
        self.shrunk_from = None
        self.grouped_prefill = device.type == "cuda"  # see OffloadExperts.start
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.allocate(store, n_slots, decay)
        # Staging slots: experts the cost model copies (prefill) but the cache does not keep. Round-robin, so the
        # copy of the next expert overlaps the compute of this one.
        self.staging = store.new_slots(n_staging, device)
        self.staging_free = [None] * n_staging  # CUDA event: the last compute that read each staging slot
        self.next_staging = 0
        # The prefetch ring: predicted experts that the cache would not admit (not hotter than its coldest one)
        # are copied here instead, round-robin, and serve the step they were predicted for (or a later one).
        try:
            self.ahead = store.new_slots(n_ahead, device) if n_ahead else None
        except torch.OutOfMemoryError:  # prefetch then only fills free or colder cache slots
            self.ahead, n_ahead = None, 0
        self.ahead_key: list[tuple[int, int] | None] = [None] * n_ahead
        self.ahead_at: dict[tuple[int, int], int] = {}
        self.ahead_free = [None] * n_ahead  # CUDA event: the last compute that read each ring slot
        self.next_ahead = 0

    def allocate(self, store, n_slots: int, decay: float) -> None:
        self.buffers = None
        want = n_slots
        while True:
            try:
                self.buffers = store.new_slots(n_slots, self.device) if n_slots else None
                break
            except torch.OutOfMemoryError:
                n_slots //= 2
        if n_slots < want:
            self.shrunk_from = want
        self.cache = SlotCache(n_slots, decay)


class OffloadExperts:
    def __init__(self, store, layer_stage: dict[int, int], stage_devices: list[torch.device], slots: list[int],
                 cost: CostModel | None = None, decay: float = 0.95, n_ahead: int = 0, top_k: int = 1):
        """layer_stage: MoE layer -> pipeline stage; each stage has a device and its own expert cache (stages may
        share a torch device when the CPU simulates several GPUs). n_ahead: prefetch ring slots per stage; top_k:
        experts a token uses per layer."""
        self.top_k = top_k
        self.store = store
        self.layer_stage = layer_stage
        self.stages = [DeviceSlots(store, n, d, decay, n_ahead=n_ahead if n else 0)
                       for d, n in zip(stage_devices, slots)]
        self.cost = cost or CostModel()
        self.stats = StepStats()
        self.prefetched: dict[int, list[tuple[int, int]]] = {}  # layer -> keys pinned until that layer runs
        self.on_routed: Callable[[int, set[int]], None] | None = None  # prefetch quality bookkeeping
        self.on_start: Callable[[int], None] | None = None  # a layer's experts start: collect its prediction
        # Layers whose every expert sits in a slot for good (their stage's cache holds all of its experts): at
        # decode they run without a host sync, inside the captured decode graphs. layer -> slot of each expert.
        self.resident_slots: dict[int, torch.Tensor] = {}
        self.resident_host: dict[int, list[int]] = {}  # layer -> slot of each expert, for resident prefill
        # Layers whose stage has no slots, served by the CPU through a host node at decode (None: not possible)
        self.cpu_nodes: dict[int, object] = {}
        self.device_ids: dict[int, torch.Tensor] = {}  # layer -> the ids tensor its device-only work writes
        self.slot_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # partly cached layers (_slot_table)
        self.tables_changed: set[int] = set()
        self.landing: list[tuple] = []  # (stage, key, slot, CUDA event or None): admitted, copy not yet known done
        self.admitted: dict[DeviceSlots, int] = {}  # copies started per stage at this step boundary
        self.device_steps: list[int] = []  # device-only layers run since the last stats, read lazily
        self.generation = 0  # bumped when slot buffers are reallocated: captured graphs must be dropped
        self.streams: dict[int, LayerStream] = {}  # stage -> its staging for streamed prefill (add_streams)
        self.expert_parallel = True  # a streamed layer's copies go over every stage's GPU, not only its own

    # -- the Experts protocol ---------------------------------------------------------------------------------
    def __call__(self, layer, x, ids, weights):
        return self.start(layer, x, ids, weights)()

    def start(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        if self.on_start is not None:
            self.on_start(layer)
        dev = self.stages[self.layer_stage[layer]]
        cache = dev.cache
        N, K = ids.shape
        if N > 1 and dev.grouped_prefill and self.graph_resident(layer):
            return self._start_resident_prefill(dev, layer, x, ids, weights)
        stream = self.streams.get(self.layer_stage[layer])
        if N > 1 and dev.grouped_prefill and stream is not None:
            return self._start_streamed(dev, stream, layer, x, ids, weights)
        ids_host = ids.cpu()  # host sync: the one per MoE layer; placement is decided on the host
        if N == 1:  # decode: K distinct experts, kept in k order
            pos, routed = None, dict.fromkeys(ids_host[0].tolist(), 1)
        else:
            pos = expert_positions(ids_host)  # expert -> its flat positions n * K + k, on the host
            routed = {e: len(p) for e, p in pos.items()}
        if self.on_routed is not None:
            self.on_routed(layer, set(routed))
        counters = self._count_use(layer, routed.items())
        nbytes, flops = self.store.expert_nbytes(), self.store.flops_per_token()
        if N == 1 and not cache.n_slots and dev.ahead is None and self.cost.place(1, nbytes, flops, False) == "cpu":
            counters.misses += K
            counters.cpu += K
            self.prefetched.pop(layer, None)  # (nothing can have been copied ahead into a stage without slots)
            return self._start_cpu_decode(layer, x, list(routed), weights)
        on_gpu, on_ring, staged, missed = [], [], [], []
        for e in routed:
            key = (layer, e)
            cache.touch(key, 1)
            slot = cache.lookup(key)
            if slot is not None:
                counters.hits += 1
                cache.pin(key)
                on_gpu.append((e, slot))
                continue
            j = dev.ahead_at.get(key)
            if j is not None:
                counters.hits += 1
                counters.ahead += 1
                on_ring.append((e, j))
                continue
            counters.misses += 1
            missed.append(e)
        if N == 1:
            to_cpu = [self.cost.place(1, nbytes, flops, cached=False) == "cpu"] * len(missed)
        else:  # the CPU's experts run while the GPU copies and computes the others: balance the two
            busy = sum(self.cost.gpu_s(routed[e], nbytes, flops) for e, _ in on_gpu + on_ring)
            to_cpu = self.cost.split([routed[e] for e in missed], nbytes, flops, busy)
        on_cpu = [e for e, cpu in zip(missed, to_cpu) if cpu]
        counters.cpu += len(on_cpu)
        # The hidden state goes to the host before any copy or expert work is queued (a few KB at decode), so this
        # copy waits for nothing else; the GPU experts and the caller's shared expert then run while the CPU
        # computes its experts in finish().
        x_host = x.to("cpu") if on_cpu else None
        for e, cpu in zip(missed, to_cpu):
            if cpu:
                continue
            counters.copies += 1
            key = (layer, e)
            got = cache.admit(key) if cache.n_slots else None  # keep it only if it is hotter than a victim
            if got is not None:
                self.stats.bytes_copied += self._copy(dev, got[0], layer, e, wait=True)
                cache.pin(key)
                on_gpu.append((e, got[0]))
            else:
                staged.append(e)
        if dev.copy_stream is not None:  # slots filled ahead (prefetch, admissions) must have landed
            torch.cuda.current_stream(dev.device).wait_stream(dev.copy_stream)
        if N == 1 and not staged:
            return self._start_decode(dev, layer, x, x_host, list(routed), on_gpu, on_ring, on_cpu, weights)
        pos = pos or expert_positions(ids_host)
        # With several tokens on CUDA, the slot experts run as one call per slot buffer (one gather of their tokens,
        # one scatter of the outputs). The CPU stand-in runs one call per expert, so that an expert's input never
        # depends on which others share its call: CPU kernels may round differently with the data's alignment.
        calls = [(buffers, group) for buffers, group in ((dev.buffers, on_gpu), (dev.ahead, on_ring)) if group]
        if N == 1 or not dev.grouped_prefill:
            calls = [(buffers, [es]) for buffers, group in calls for es in group]
        # Every call's positions reach the device in one copy that does not wait for the queue; then each staged
        # expert's, and the CPU's experts' last, as one group, for one scatter of their outputs.
        at = positions_on([torch.cat([pos[e] for e, _ in group]) for _, group in calls] + [pos[e] for e in staged]
                          + ([torch.cat([pos[e] for e in on_cpu])] if on_cpu else []), x.device)
        parts = x.new_zeros(N, K, x.shape[-1])
        flat = parts.view(N * K, -1)  # [N*K, D]
        t0 = time.perf_counter()
        for (buffers, group), at_c in zip(calls, at):
            slots = [s for _, s in group]
            if len(group) == 1:
                flat[at_c] = self.store.compute_slot(buffers, slots[0], layer, x[at_c // K])
            else:
                counts = [routed[e] for e, _ in group]
                flat[at_c] = self.store.compute_slots_prefill(buffers, slots, layer, x[at_c // K], counts)
        self._ring_read(dev, on_ring)
        for e, at_e in zip(staged, at[len(calls):]):
            flat[at_e] = self._staged(dev, layer, e, x[at_e // K])
        self.stats.gpu_s += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            if on_cpu:
                t0 = time.perf_counter()
                ys = [self.store.compute_host(layer, e, x_host[pos[e] // K]) for e in on_cpu]
                flat[at[-1]] = to_device(torch.cat(ys), x.device)  # one copy, which does not wait for the queue
                self.stats.cpu_s += time.perf_counter() - t0
            self._release(dev, layer, on_gpu, on_cpu)
            return combine(parts, weights, x.dtype)

        return finish

    def _start_decode(self, dev: DeviceSlots, layer: int, x, x_host, order: list[int], on_gpu, on_ring, on_cpu,
                      weights):
        """One token: the cached experts in one grouped launch (and the prefetch ring's in another), the CPU's
        experts in one batch, their outputs placed in k order with at most one small index copy."""
        t0 = time.perf_counter()
        where = {e: k for k, e in enumerate(order)}
        on_gpu = sorted(on_gpu, key=lambda es: where[es[0]])
        ys = [self.store.compute_slots(buffers, [s for _, s in group], layer, x)  # [G, 1, D] each
              for buffers, group in ((dev.buffers, on_gpu), (dev.ahead, on_ring)) if group]
        self._ring_read(dev, on_ring)
        cols = [where[e] for e, _ in on_gpu + on_ring]
        self.stats.gpu_s += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            parts, order = ys, cols
            if on_cpu:
                t0 = time.perf_counter()
                ys_cpu = self.store.compute_host_many(layer, on_cpu, x_host)  # [C, 1, D]
                parts = ys + [to_device(ys_cpu, x.device)]
                order = cols + [where[e] for e in on_cpu]
                self.stats.cpu_s += time.perf_counter() - t0
            parts = torch.cat(parts) if len(parts) > 1 else parts[0]
            if order != sorted(order):  # back into k order
                inverse = sorted(range(len(order)), key=order.__getitem__)
                parts = parts[to_device(torch.tensor(inverse), x.device)]
            self._release(dev, layer, on_gpu, on_cpu, decode=True)
            return combine(parts.transpose(0, 1), weights, x.dtype)  # [1, K, D] -> [1, D]

        return finish

    def _start_cpu_decode(self, layer: int, x: torch.Tensor, experts: list[int], weights: torch.Tensor):
        """One token whose experts all run on the CPU (a stage without slots, the cost model's choice at decode): no
        cache bookkeeping, and the CPU sums them in k order (the bits `combine` gives), so one row comes back."""
        x_host, w_host = x.to("cpu"), weights.to("cpu")  # a few KB, before the caller queues the shared expert

        def finish() -> torch.Tensor:
            t0 = time.perf_counter()
            y = self.store.compute_host_sum(layer, experts, x_host, w_host)
            if y is None:
                y = combine(self.store.compute_host_many(layer, experts, x_host).transpose(0, 1), w_host, x.dtype)
            self.stats.cpu_s += time.perf_counter() - t0
            return to_device(y.to(x.dtype), x.device)  # one copy, which does not wait for the queue

        return finish

    def _start_resident_prefill(self, dev: DeviceSlots, layer: int, x, ids, weights):
        """Several tokens through a layer whose experts all sit in slots for good: nothing to place, copy or pin, so
        the tokens are sorted by expert on the device and only the count per expert comes to the host (the
        layer's one host sync; a per-expert walk through the placement logic took several times the GPU's work at
        a 512-token prefill). Then one grouped call over the used experts, as the general path makes it."""
        N, K = ids.shape
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # the flat positions n * K + k, grouped by expert, ascending
        counts = torch.bincount(flat, minlength=self.store.n_experts[layer]).tolist()  # host sync
        slot_of = self._resident_host(dev, layer)
        used = [e for e, c in enumerate(counts) if c]
        if self.on_routed is not None:
            self.on_routed(layer, set(used))
        self._count_use(layer, [(e, counts[e]) for e in used]).hits += len(used)
        t0 = time.perf_counter()
        ys = self.store.compute_slots_prefill(dev.buffers, [slot_of[e] for e in used], layer, x[order // K],
                                              [counts[e] for e in used])
        parts = x.new_empty(N * K, x.shape[-1])
        parts[order] = ys
        self.stats.gpu_s += time.perf_counter() - t0
        return lambda: combine(parts.view(N, K, -1), weights, x.dtype)

    # -- streamed prefill (offload.stream) ---------------------------------------------------------------------
    def add_streams(self, rows: list[int]) -> None:
        """Give each stage with rows[stage] > 0 its double-buffered staging for streamed prefill (fewer rows where
        the device cannot hold them; none if it cannot hold one)."""
        for s, (dev, n) in enumerate(zip(self.stages, rows)):
            while n > 0:
                try:
                    self.streams[s] = LayerStream(self.store, dev.device, n, dev.copy_stream)
                    break
                except torch.OutOfMemoryError:
                    n //= 2

    def _start_streamed(self, dev: DeviceSlots, stream: LayerStream, layer: int, x, ids, weights):
        """Several tokens through a layer whose experts are not all in slots, streamed (offload.stream): the tokens
        sorted by expert on the device and only the counts on the host (the layer's one host sync); cached experts
        from their slots, experts copied ahead from staging, the rest split between the CPU (few-token experts,
        computed in finish() while the GPU works) and large copies into staging; one grouped call per buffer.
        Then, if the chunk used most of the uncached experts, the next layer of the stage is copied ahead. With
        several GPUs (expert_parallel), each streams a share of the copies over its own link and computes it."""
        N, K = ids.shape
        E = self.store.n_experts[layer]
        counts = torch.bincount(ids.flatten(), minlength=E).tolist()  # host sync: the layer's one
        used = [e for e, c in enumerate(counts) if c]
        if self.on_routed is not None:
            self.on_routed(layer, set(used))
        counters = self._count_use(layer, [(e, counts[e]) for e in used])
        cache = dev.cache
        n_uncached = sum(cache.lookup((layer, e)) is None for e in range(E))
        cached: dict[int, int] = {}
        for e in used:
            key = (layer, e)
            cache.touch(key, 1)
            slot = cache.lookup(key)
            if slot is not None:
                cache.pin(key)
                cached[e] = slot
        streams = self._layer_streams(stream)
        held = held_by(streams, layer)
        staged = [e for e in used if e not in cached and e in held]
        missing = [e for e in used if e not in cached and e not in held]
        nbytes, flops = self.store.expert_nbytes(), self.store.flops_per_token()
        # the GPU's experts run grouped (no launch per expert), their copies spread over every stream's link
        cost = replace(self.cost, launch_s=0.0, h2d_bytes_per_s=self.cost.h2d_bytes_per_s * len(streams))
        busy_cached = sum(cost.gpu_s(counts[e], nbytes, flops) for e in cached)
        busy = busy_cached + sum(cost.gpu_s(counts[e], nbytes, flops) for e in staged)
        to_cpu = cost.split([counts[e] for e in missing], nbytes, flops, busy)
        # the CPU's share had nothing been copied ahead: the next layer's copy ahead leaves it that share
        uncached = [counts[e] for e in used if e not in cached]
        hypothetical = cost.split(uncached, nbytes, flops, busy_cached) if staged else to_cpu
        cpu_share = sum(hypothetical) / len(uncached) if uncached else 0.0
        on_cpu = [e for e, cpu in zip(missing, to_cpu) if cpu]
        copy = shares([e for e, cpu in zip(missing, to_cpu) if not cpu], len(streams))
        counters.hits += len(cached)
        counters.misses += len(used) - len(cached)
        counters.cpu += len(on_cpu)
        counters.copies += sum(map(len, copy))
        # the cache takes staged experts hotter than its coldest: copied from staging on the device, not again
        admit = {}
        for e in [e for e in staged if held[e][0] == 0] + copy[0]:
            got = cache.admit((layer, e)) if cache.n_slots else None
            if got is not None:
                admit[e] = got[0]
                # the decode graphs' slot tables (partly cached layers): their device copies are refreshed at the
                # step's end (take_stats), after the copy from staging queued below
                if got[1] is not None:
                    self._set_slot(got[1], -1)
                self._set_slot((layer, e), got[0])
        if dev.copy_stream is not None:  # slots filled ahead (prefetch, admissions) must have landed
            torch.cuda.current_stream(dev.device).wait_stream(dev.copy_stream)
        t0 = time.perf_counter()
        work = prefill_layer(streams, layer, x, ids, counts, cached, dev.buffers, copy, on_cpu, admit)
        self.stats.bytes_copied += work.nbytes
        # Copying ahead from the mmap tier keeps the host busy filling bounce pieces: after the CPU's experts then
        ahead = n_uncached and len(used) - len(cached) >= AHEAD_USED * n_uncached
        if ahead and self.store.tier != "mmap":
            self._copy_ahead_layer(dev, streams, layer, cpu_share)
        self.stats.gpu_s += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            if on_cpu:
                t0 = time.perf_counter()
                xs = work.x_cpu.split([counts[e] for e in on_cpu])
                work.put_cpu(torch.cat([self.store.compute_host(layer, e, xe) for e, xe in zip(on_cpu, xs)]))
                self.stats.cpu_s += time.perf_counter() - t0
            if ahead and self.store.tier == "mmap":
                self._copy_ahead_layer(dev, streams, layer, cpu_share)
            # No admission of CPU-served experts here (`_admit_hot`): the staged ones were admitted above, from
            # the device, with the slot tables kept in step; a CPU-served one would cross PCIe again
            self._release(dev, layer, list(cached.items()), [])
            return combine(work.parts.view(N, K, -1), weights, x.dtype)

        return finish

    def _layer_streams(self, own: LayerStream) -> list[LayerStream]:
        """The streams a layer's prefill copies over: its own device's first, then (expert_parallel) every other
        GPU's, each with its own link."""
        return [own] + ([st for st in self.streams.values() if st is not own] if self.expert_parallel else [])

    def _copy_ahead_layer(self, dev: DeviceSlots, streams: list[LayerStream], layer: int, cpu_share: float) -> None:
        """Copy the stage's next MoE layer's uncached experts into staging now, before its routing is known (the
        chunk used most of this layer's uncached experts: offload.stream, 5.), a share over each stream, all but
        the last cpu_share of them (the CPU's, as the cost model split this layer)."""
        stage = self.layer_stage[layer]
        later = [m for m in self.store.n_experts if self.layer_stage[m] == stage and m > layer]
        if not later:
            return
        nxt = min(later)
        experts = [e for e in range(self.store.n_experts[nxt]) if dev.cache.lookup((nxt, e)) is None]
        experts = experts[:len(experts) - round(cpu_share * len(experts))]
        for stream, share in zip(streams, shares(experts, len(streams))):
            copied, nbytes = stream.ahead(nxt, share)
            if copied:
                self.stats.layers.setdefault(nxt, LayerCounters()).copies += len(copied)
                self.stats.bytes_copied += nbytes

    def _resident_host(self, dev: DeviceSlots, layer: int) -> list[int]:
        """The slot of each expert of a resident layer, on the host (resident_slots: the same on the device)."""
        got = self.resident_host.get(layer)
        if got is None:
            got = self.resident_host[layer] = [dev.cache.lookup((layer, e))
                                               for e in range(self.store.n_experts[layer])]
        return got

    def _ring_read(self, dev: DeviceSlots, on_ring) -> None:
        """Remember the compute that reads these ring slots: a later copy into one of them waits for it."""
        if on_ring and dev.copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(dev.device))
            for _, j in on_ring:
                dev.ahead_free[j] = done

    def _release(self, dev: DeviceSlots, layer: int, on_gpu, on_cpu, decode: bool = False) -> None:
        cache = dev.cache
        for e, _ in on_gpu:
            cache.unpin((layer, e))
        for key in self.prefetched.pop(layer, []):
            cache.unpin(key)
        self._admit_hot(dev, layer, on_cpu, decode)

    # -- one token as device work only (what the decode graphs capture) --------------------------------------
    def device_only(self, layer: int) -> bool:
        """Whether one token's experts of this layer run without a host sync: every expert of the stage sits in a
        slot for good (computed there from ids looked up on the device), or the CPU serves the experts that are
        not in a slot through a host node (`host_node.CpuExpertsNode`), the whole layer where the stage has no
        slots."""
        return self.graph_resident(layer) or self._cpu_node(layer) is not None

    def start_device(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        dev = self.stages[self.layer_stage[layer]]
        if self.graph_resident(layer):
            table = self.resident_slots.get(layer)
            if table is None:
                table = torch.tensor(self._resident_host(dev, layer), device=x.device)
                self.resident_slots[layer] = table
            ys = self.store.compute_slots_graph(dev.buffers, table[ids[0]], layer, x)  # [K, 1, D]
            if ys is None:
                raise RuntimeError(f"layer {layer}'s slots cannot be computed from device-side ids")
            self.device_ids[layer] = ids
            return lambda: combine(ys.transpose(0, 1), weights, x.dtype)
        node = self._cpu_node(layer)
        if node is None:
            raise RuntimeError(f"layer {layer}'s experts need a host sync")
        self.device_ids[layer] = node.ids  # the host buffer the node's copy fills at every run
        if node.slots is None:
            return node.start(x, ids, weights)
        # Part of the layer's experts sit in slots: the slot table (on the device, and its host copy that the node
        # reads) says which; the GPU computes those while the CPU computes the others, each expert's output lands
        # in its own row k, and they are combined in k order (as the host-placed path does)
        slot_ids = self.slot_tables[layer][0][ids[0]]  # [K]: a slot, or -1 for the CPU
        cpu_parts = node.start(x, ids, weights)
        ys = self.store.compute_slots_graph(dev.buffers, slot_ids, layer, x)  # [K, 1, D], misses' rows unwritten

        def finish() -> torch.Tensor:
            parts = torch.where((slot_ids >= 0)[:, None], ys[:, 0], cpu_parts())  # [K, D]
            return combine(parts[None], weights, x.dtype)

        return finish

    def ran_device(self, layer: int) -> None:
        self.device_steps.append(layer)

    def _cpu_node(self, layer: int):
        """The layer's CPU experts as a host node where the cost model sends decode misses to the CPU and the store
        has a C-callable kernel for them: for the whole layer on a stage without slots, for the experts outside the
        slots where the stage caches part of its experts (not all: those layers are resident). Else None."""
        if layer in self.cpu_nodes:
            return self.cpu_nodes[layer]
        dev = self.stages[self.layer_stage[layer]]
        node = None
        nbytes, flops = self.store.expert_nbytes(), self.store.flops_per_token()
        got = self.store.host_task_weights(layer)
        partial = dev.cache.n_slots > 0 and not self._stage_full(dev) and self.store.graph_slots(dev.buffers, layer)
        if (got is not None and dev.ahead is None and self.cost.place(1, nbytes, flops, False) == "cpu"
                and (not dev.cache.n_slots or partial)):
            from .host_node import CpuExpertsNode
            # The thread that drives the GPU spins while it waits for a step: leave it a core of its own, or the
            # kernels' static work split waits for the thread sharing its core (2x slower on 16 cores)
            threads = ck.get_threads()
            if dev.device.type == "cuda" and threads >= (os.cpu_count() or 1) > 1:
                threads -= 1
            slots = self._slot_table(layer)[1].numpy() if partial else None
            node = CpuExpertsNode(*got[0], got[1], self.top_k, dev.device, threads=threads, slots=slots)
        self.cpu_nodes[layer] = node
        return node

    def _slot_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(device int32 [E], its host copy): each expert's slot in its stage's buffers, or -1 where it has none or
        its copy into one has not landed yet. Changed only between decode steps (`_finish_step`)."""
        got = self.slot_tables.get(layer)
        if got is None:
            dev = self.stages[self.layer_stage[layer]]
            landing = {key for _, key, _, _ in self.landing}
            slots = [-1 if (layer, e) in landing else dev.cache.lookup((layer, e))
                     for e in range(self.store.n_experts[layer])]
            host = torch.tensor([-1 if s is None else s for s in slots], dtype=torch.int32,
                                pin_memory=dev.device.type == "cuda")
            got = self.slot_tables[layer] = (host.to(dev.device), host)
        return got

    def _set_slot(self, key: tuple[int, int], slot: int) -> None:
        table = self.slot_tables.get(key[0])
        if table is not None:
            table[1][key[1]] = slot
            self.tables_changed.add(key[0])

    def _finish_step(self) -> None:
        """After a decode step (nothing queued reads the tables now): count the device-only layers' expert use
        from their ids; in partly cached layers, record the uses in the cache and admit CPU-served experts that
        have become hot (the host-placed path's rule, `_admit_hot`), each copy landing in the background: its
        victim leaves the tables now, the new expert joins them at the first step boundary after its copy is done.
        """
        self.admitted.clear()
        self._count_device()
        for dev, key, slot, done in list(self.landing):
            if done is None or done.query():
                self._set_slot(key, slot)
                self.landing.remove((dev, key, slot, done))
        for layer in self.tables_changed:
            device, host = self.slot_tables[layer]
            device.copy_(host, non_blocking=True)  # queued before the next step reads it
        self.tables_changed.clear()

    def graph_resident(self, layer: int) -> bool:
        """Whether `resident` serves this layer's decode steps: its stage's cache holds all of the stage's experts
        for good, in slots the store computes from device-side ids."""
        dev = self.stages[self.layer_stage[layer]]
        return self._stage_full(dev) and self.store.graph_slots(dev.buffers, layer)

    def _stage_full(self, dev: DeviceSlots) -> bool:
        stage = self.stages.index(dev)
        total = sum(n for layer, n in self.store.n_experts.items() if self.layer_stage[layer] == stage)
        return dev.cache.n_slots > 0 and len(dev.cache) == total

    def _count_device(self) -> None:
        """Expert use of the device-only layers' steps, read from their ids after the fact (one small copy per
        device for the resident ones: a copy per layer would be a host sync per layer; the CPU nodes' ids are in
        host buffers already). Partly cached layers also update their cache (see `_finish_step`)."""
        steps = self.device_steps
        rows: list[list[int]] = [[] for _ in steps]
        for device in {self.device_ids[layer].device for layer in steps}:
            mine = [i for i, layer in enumerate(steps) if self.device_ids[layer].device == device]
            flat = torch.cat([self.device_ids[steps[i]][0] for i in mine]).tolist()
            k = len(flat) // len(mine)
            for j, i in enumerate(mine):
                rows[i] = flat[j * k:(j + 1) * k]
        for layer, row in zip(steps, rows):
            counters = self._count_use(layer, [(e, 1) for e in row])
            node = self.cpu_nodes.get(layer)
            if node is None:
                counters.hits += len(row)
                continue
            on_cpu = row if node.slots is None else [e for e in row if node.slots[e] < 0]
            self.stats.cpu_s += node.take_seconds()
            counters.hits += len(row) - len(on_cpu)
            counters.misses += len(on_cpu)
            counters.cpu += len(on_cpu)
            if node.slots is not None:
                dev = self.stages[self.layer_stage[layer]]
                for e in row:
                    dev.cache.touch((layer, e), 1)
                self._admit_landing(dev, layer, on_cpu)
        self.device_steps.clear()

    def _admit_landing(self, dev: DeviceSlots, layer: int, served_by_cpu: list[int]) -> None:
        for e in served_by_cpu:
            key = (layer, e)
            if self.admitted.get(dev, 0) >= ADMIT_PER_STEP or not dev.cache.would_admit(key, min_score=REUSED):
                continue
            self.admitted[dev] = self.admitted.get(dev, 0) + 1
            got = dev.cache.admit(key)
            if got is None:
                continue
            slot, evicted = got
            if evicted is not None:
                self._set_slot(evicted, -1)
            # the copy waits for everything queued so far, so nothing still reads the victim's slot
            self.stats.bytes_copied += self._copy(dev, slot, layer, e, wait=False)
            self.stats.layers[layer].copies += 1
            done = None
            if dev.copy_stream is not None:
                done = torch.cuda.Event()
                done.record(dev.copy_stream)
            self.landing.append((dev, key, slot, done))

    def _count_use(self, layer: int, tokens_of) -> LayerCounters:
        """Add (expert, tokens) pairs to the step's per-expert use; -> the layer's counters, to count hits etc."""
        used = self.stats.expert_tokens.setdefault(layer, {})
        for e, n in tokens_of:
            used[e] = used.get(e, 0) + n
        return self.stats.layers.setdefault(layer, LayerCounters())

    # -- slots ----------------------------------------------------------------------------------------------
    def _copy(self, dev: DeviceSlots, slot: int, layer: int, e: int, wait: bool) -> int:
        if dev.copy_stream is None:
            return self.store.copy_to_slot(dev.buffers, slot, layer, e)
        # The copy must not overwrite a slot that queued compute still reads: order it after the compute stream.
        dev.copy_stream.wait_stream(torch.cuda.current_stream(dev.device))
        with torch.cuda.stream(dev.copy_stream):
            n = self.store.copy_to_slot(dev.buffers, slot, layer, e)
        if wait:
            torch.cuda.current_stream(dev.device).wait_stream(dev.copy_stream)
        return n

    def _staged(self, dev: DeviceSlots, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """Copy an expert into the next staging slot and compute it there. On CUDA nothing blocks the host: the
        copy waits for the slot's previous reader, and the compute waits for the copy."""
        j = dev.next_staging
        dev.next_staging = (j + 1) % len(dev.staging_free)
        if dev.copy_stream is None:
            self.stats.bytes_copied += self.store.copy_to_slot(dev.staging, j, layer, e)
            return self.store.compute_slot(dev.staging, j, layer, x)
        compute = torch.cuda.current_stream(dev.device)
        if dev.staging_free[j] is not None:
            dev.copy_stream.wait_event(dev.staging_free[j])
        with torch.cuda.stream(dev.copy_stream):
            self.stats.bytes_copied += self.store.copy_to_slot(dev.staging, j, layer, e)
            copied = torch.cuda.Event()
            copied.record(dev.copy_stream)
        compute.wait_event(copied)
        y = self.store.compute_slot(dev.staging, j, layer, x)
        dev.staging_free[j] = torch.cuda.Event()
        dev.staging_free[j].record(compute)
        return y

    def _admit_hot(self, dev: DeviceSlots, layer: int, served_by_cpu: list[int], decode: bool = False) -> None:
        """Experts served by the CPU that have become hotter than the coldest cached one take its slot, if they
        were used more than once lately: under routing without locality, admitting every expert used once would
        spend PCIe on experts that are not used again before they are evicted. At decode, at most ADMIT_PER_STEP
        copies per stage and step (as `_admit_landing`)."""
        for e in served_by_cpu:
            key = (layer, e)
            if decode and self.admitted.get(dev, 0) >= ADMIT_PER_STEP:
                return
            if dev.cache.would_admit(key, min_score=REUSED):
                if decode:
                    self.admitted[dev] = self.admitted.get(dev, 0) + 1
                got = dev.cache.admit(key)
                if got is not None:
                    self.stats.bytes_copied += self._copy(dev, got[0], layer, e, wait=False)
                    self.stats.layers[layer].copies += 1

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Copy predicted experts of `layer` ahead of use; they stay pinned until that layer has run. `experts` is
        ordered most confident first. A missing one goes to a cache slot if the cache admits it, else to the ring,
        but no more copies are issued than the cost model's quota: the CPU computes the other misses meanwhile, so
        copying every one would leave the CPU idle and make the step wait on PCIe."""
        dev = self.stages[self.layer_stage[layer]]
        missing = [e for e in experts
                   if dev.cache.lookup((layer, e)) is None and (layer, e) not in dev.ahead_at]
        self.store.will_need(layer, missing)
        quota = self.cost.ring_quota(len(set(missing) & set(experts[:self.top_k])), self.store.expert_nbytes(),
                                     self.store.flops_per_token())
        pinned = self.prefetched.setdefault(layer, [])
        ringed: list[int] = []
        for e in experts:
            key = (layer, e)
            if dev.cache.lookup(key) is None:
                if key in dev.ahead_at or quota == 0:
                    continue
                quota -= 1
                got = dev.cache.admit(key) if dev.cache.would_admit(key) else None
                if got is None:
                    if len(ringed) < len(dev.ahead_key):  # not more than the ring holds
                        ringed.append(e)
                    continue
                self.stats.bytes_copied += self._copy(dev, got[0], layer, e, wait=False)
            dev.cache.pin(key)
            pinned.append(key)
        for e in ringed:
            self._copy_ahead(dev, layer, e)

    def _copy_ahead(self, dev: DeviceSlots, layer: int, e: int) -> None:
        """Copy a predicted expert into the next ring slot (after the last compute that read that slot)."""
        key = (layer, e)
        if key in dev.ahead_at:
            return
        j = dev.next_ahead
        dev.next_ahead = (j + 1) % len(dev.ahead_key)
        old = dev.ahead_key[j]
        if old is not None:
            del dev.ahead_at[old]
        if dev.copy_stream is None:
            self.stats.bytes_copied += self.store.copy_to_slot(dev.ahead, j, layer, e)
        else:
            if dev.ahead_free[j] is not None:
                dev.copy_stream.wait_event(dev.ahead_free[j])
            with torch.cuda.stream(dev.copy_stream):
                self.stats.bytes_copied += self.store.copy_to_slot(dev.ahead, j, layer, e)
        dev.ahead_key[j] = key
        dev.ahead_at[key] = j

    def warm(self, keys: list[tuple[int, int]]) -> int:
        """Copy these experts into their stages' slots now (everything that fits, or a saved popularity list)."""
        copied = 0
        for layer, e in keys:
            dev = self.stages[self.layer_stage[layer]]
            if len(dev.cache) >= dev.cache.n_slots:
                continue
            got = dev.cache.admit((layer, e), force=True)
            if got is not None:
                copied += self._copy(dev, got[0], layer, e, wait=True)
        return copied

    def shrink(self, stage: int, fraction: float = 0.5) -> int:
        """Give back GPU memory: the stage's cache restarts with `fraction` of its slots. Returns slots freed."""
        dev = self.stages[stage]
        before = dev.cache.n_slots
        dev.buffers = None
        if dev.device.type == "cuda":
            torch.cuda.empty_cache()
        dev.allocate(self.store, int(before * fraction), dev.cache.decay)
        self.prefetched.clear()
        self.resident_slots.clear()
        self.resident_host.clear()
        self.slot_tables.clear()  # the new cache starts empty; the host nodes read the tables: rebuild them too
        self.landing.clear()
        self.cpu_nodes.clear()
        self.generation += 1
        return before - dev.cache.n_slots

    def tick(self) -> None:
        for dev in self.stages:
            dev.cache.tick()

    def take_stats(self) -> dict:
        self._finish_step()
        s, self.stats = self.stats, StepStats()
        hits = sum(c.hits for c in s.layers.values())
        misses = sum(c.misses for c in s.layers.values())
        return {"expert_tokens": s.expert_tokens, "cache_hits": hits, "cache_misses": misses,
                "cache_hit_rate": hits / max(1, hits + misses), "bytes_copied": s.bytes_copied,
                "cpu_expert_s": s.cpu_s, "gpu_expert_s": s.gpu_s,
                "layers": {layer: vars(c) for layer, c in s.layers.items()},
                "cached_experts": [len(v.cache) for v in self.stages]}
