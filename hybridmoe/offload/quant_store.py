"""QuantStore: routed experts kept as GGUF stores them, for the offload engine (same interface as DenseStore).

Host tiers: "mmap" computes from the file's pages; "pinned" copies each layer's experts once into pinned RAM in the
GPU slot layout (one contiguous row per expert), so a host-to-device copy is a single asynchronous transfer.
`repack=True` also keeps a lane-interleaved copy for the CPU kernels, one stacked copy per layer ([E, ...] per
projection, made when the layer is first computed), which decodes faster but sums in another order (results then
agree within kernel tolerance, not bit for bit). `activations` ("int8" or "f32", kernels.cpu) say whether the CPU
rounds x to 8 bits at decode; with "int8" a decode step computes all of a layer's CPU experts in one kernel call,
from the file's bytes on the mmap tier (layers of kernels.cpu.RAW_INT8_TYPES), else from the repacked copy.
GPU slots hold the same raw bytes (kernels.gpu.SlotLayout); with the CPU standing in for the GPU, slots are computed
with the CPU kernels on the slot's own copy of the bytes. At prefill on the GPU, a layer's slot experts run together
(`compute_slots_prefill`): per chunk of experts, one dequantization launch per projection into a bf16 scratch, then
one grouped matrix product (torch._grouped_mm).
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels import cpu as ck
from ..layers.moe import to_device
from .store import will_need

# From this many tokens per expert on, dequantizing tiles for a matmul beats the GEMV kernels, which read each row
# once for all tokens (on 768x2048 Q4_K, 2 cores: a tile matmul costs 4x the GEMV at 64 tokens).
PREFILL_TOKENS = 256
# Prefill on the GPU dequantizes one projection of a chunk of experts to bf16 at once, into one scratch buffer
# reused for gate, up and down: this bounds it, well inside the memory the runtime keeps free beside the expert
# cache (1.5 GiB). The bf16 grouped matrix product takes fewer than 1024 groups.
SCRATCH_BYTES = 512 << 20
MAX_GROUPS = 512

try:  # the GPU kernels need triton; the CPU stand-in does not
    from ..kernels import gpu as gk
except ImportError:  # pragma: no cover - triton is missing
    gk = None


def host_f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 CPU tensor; at decode it already is one, and the no-op conversions are skipped (each
    would start with the caches the kernels have just flushed)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():
        return t.detach() if t.requires_grad else t
    return t.detach().to("cpu", torch.float32).contiguous()


class _Layout:
    """gate/up/down byte ranges of one expert row: kernels.gpu.SlotLayout when the GPU kernels exist and take these
    types, else the same rule (256-byte aligned parts) with no GPU layout."""

    def __init__(self, dim: int, inter: int, types: tuple, sizes: tuple[int, int, int]):
        self.sizes, self.types, self.gpu = sizes, types, None
        if gk is not None:
            try:
                self.gpu = gk.SlotLayout(dim, inter, *types)
            except ValueError:  # a block type without a GPU kernel: the CPU computes it
                pass
        if self.gpu is not None:
            self.offsets = (self.gpu.gate_offset, self.gpu.up_offset, self.gpu.down_offset)
            self.nbytes = self.gpu.nbytes
        else:
            align = lambda n: -(-n // 256) * 256  # noqa: E731
            self.offsets = (0, align(sizes[0]), align(sizes[0]) + align(sizes[1]))
            self.nbytes = self.offsets[2] + align(sizes[2])


class QuantStore:
    def __init__(self, layers: dict, tier: str = "mmap", pin: bool = False, repack: bool = False,
                 activations: str = "f32"):
        """layers: layer -> (gate, up, down) GGUFTensor, each [E, rows, row_bytes] of raw blocks."""
        if tier not in ("mmap", "pinned"):
            raise ValueError(f"experts tier {tier!r}: use mmap or pinned")
        if activations not in ck.ACTIVATIONS:
            raise ValueError(f"CPU activations {activations!r}: use one of {', '.join(ck.ACTIVATIONS)}")
        self.layers, self.tier, self.repack, self.activations = layers, tier, repack, activations
        gate, up, down = next(iter(layers.values()))
        self.n_experts = {layer: t[0].shape[0] for layer, t in layers.items()}
        self.inter, self.dim = gate.shape[1], gate.shape[2]
        # Mixed quantizations (e.g. Q4_K_M) give some layers' down projections another type, so the layout is
        # per layer; every slot is as large as the largest layer's expert.
        self.types = {layer: tuple(p.qtype for p in t) for layer, t in layers.items()}
        self.layouts = {layer: _Layout(self.dim, self.inter, self.types[layer], tuple(p.raw[0].nbytes for p in t))
                        for layer, t in layers.items()}
        self.row_bytes = max(lay.nbytes for lay in self.layouts.values())
        self.packable = {layer: all(t in ck.PACKED_TYPES for t in types) for layer, types in self.types.items()}
        # 8-bit activations: on the mmap tier, layers whose types the raw-layout kernels take read the file's bytes in
        # place; the others (and the pinned tier) get the repacked copy that the 8-bit kernels read there, where
        # their types can be repacked (Q2_K, Q3_K and IQ4_XS cannot: those read the file's bytes on either tier).
        self.raw_int8 = {layer: activations == "int8" and all(t in ck.RAW_INT8_TYPES for t in types)
                         and (not self.packable[layer] or (tier == "mmap" and not repack))
                         for layer, types in self.types.items()}
        self.rows: dict[int, torch.Tensor] = {}  # pinned tier: layer -> uint8 [E, nbytes]
        if tier == "pinned":
            for layer in layers:
                self.rows[layer] = self._pack_layer(layer, pin)
        self.packed: dict[int, tuple] = {}  # layer -> repacked gate, up, down (kernels.cpu.PackedExperts)
        self.grouped_mm_ok: dict[torch.device, bool] = {}  # whether torch._grouped_mm ran there (tried once)
        # Block types whose grouped prefill reads the blocks in the matrix product (kernels.gpu.grouped_gemm, gate
        # and up fused) instead of dequantizing into bf16 first; empty until measured faster on a GPU.
        self.quant_gemm: set = set()

    def _pack_layer(self, layer: int, pin: bool) -> torch.Tensor:
        E = self.n_experts[layer]
        rows = torch.zeros(E, self.layouts[layer].nbytes, dtype=torch.uint8, pin_memory=pin)
        for e in range(E):
            self._fill_row(rows[e], layer, e)
        return rows

    def _fill_row(self, row: torch.Tensor, layer: int, e: int) -> None:
        lay = self.layouts[layer]
        for t, off, size in zip(self.layers[layer], lay.offsets, lay.sizes):
            row[off:off + size] = torch.from_numpy(np.ascontiguousarray(t.raw[e]).reshape(-1))

    def _raw(self, layer: int, proj: int, e: int) -> np.ndarray:
        """uint8 [rows, row_bytes] of one projection of one expert (from the pinned copy when there is one)."""
        t = self.layers[layer][proj]
        if layer in self.rows:
            lay = self.layouts[layer]
            off, size = lay.offsets[proj], lay.sizes[proj]
            return self.rows[layer][e, off:off + size].numpy().reshape(t.raw.shape[1:])
        return t.raw[e]

    def prepack(self) -> None:
        """Make every layer's lane-interleaved copy now rather than on first use (repack=True)."""
        for layer in self.layers:
            self._packed_layer(layer)

    def _packed_layer(self, layer: int) -> tuple | None:
        """The layer's repacked gate, up and down, all experts stacked (made on first use), or None without repack."""
        packed = self.packed.get(layer)
        wanted = self.repack or (self.activations == "int8" and not self.raw_int8[layer])
        if packed is not None or not wanted or not self.packable[layer]:
            return packed
        raws = (np.asarray(t.raw) for t in self.layers[layer])
        if layer in self.rows:  # the pinned copy, not the file's pages
            raws = (np.stack([self._raw(layer, p, e) for e in range(self.n_experts[layer])]) for p in range(3))
        packed = self.packed[layer] = tuple(ck.repack_experts(r, t, self.activations)
                                            for r, t in zip(raws, self.types[layer]))
        return packed

    # -- interface used by OffloadExperts ---------------------------------------------------------------------
    def expert_nbytes(self) -> int:
        return max(sum(lay.sizes) for lay in self.layouts.values())

    def slot_nbytes(self) -> int:
        return self.row_bytes

    def flops_per_token(self) -> float:
        return 6.0 * self.inter * self.dim

    def host(self, layer: int, e: int):
        return tuple(self._raw(layer, p, e) for p in range(3))

    @staticmethod
    def _linear(x: torch.Tensor, raw: np.ndarray, qtype) -> torch.Tensor:
        if x.shape[0] >= PREFILL_TOKENS or qtype not in ck.GEMV_TYPES:
            return ck.matmul(x, raw, qtype)
        return ck.gemv(x, raw, qtype)

    def _ffn(self, x: torch.Tensor, layer: int, raws, e: int | None) -> torch.Tensor:
        """One expert on the CPU. raws() gives its raw rows, asked for only when needed (e given: the repacked
        copy is used when there is one)."""
        xs = host_f32(x)
        if e is not None and xs.shape[0] < PREFILL_TOKENS and self.raw_int8[layer]:
            if xs.shape[0] > 1:  # prefill: as compute_host_grouped computes each expert
                return self.compute_host_grouped(layer, [e], xs, [xs.shape[0]]).to(x.dtype)
            return torch.from_numpy(self._raw_int8(layer, [e], xs)[0]).to(x.dtype)
        packed = self._packed_layer(layer) if e is not None and xs.shape[0] < PREFILL_TOKENS else None
        if packed is not None:
            return torch.from_numpy(ck.ffn_experts(xs.numpy(), *packed, [e])[0]).to(x.dtype)
        (g, u, d), types = raws(), self.types[layer]
        h = F.silu(self._linear(xs, g, types[0])) * self._linear(xs, u, types[1])
        return self._linear(h.contiguous(), d, types[2]).to(x.dtype)

    def compute_host(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._ffn(x, layer, lambda: self.host(layer, e), e)

    def compute_host_many(self, layer: int, experts: list[int], x: torch.Tensor) -> torch.Tensor:
        """Several experts on the same tokens -> [G, n, D], each as compute_host gives it; from the repacked copy at
        decode, in one kernel call with 8-bit activations."""
        if x.shape[0] < PREFILL_TOKENS and self.raw_int8[layer]:
            return torch.from_numpy(self._raw_int8(layer, experts, host_f32(x))).to(x.dtype)
        packed = self._packed_layer(layer) if x.shape[0] < PREFILL_TOKENS else None
        if packed is None:
            return torch.stack([self.compute_host(layer, e, x) for e in experts])
        xs = host_f32(x)
        return torch.from_numpy(ck.ffn_experts(xs.numpy(), *packed, experts)).to(x.dtype)

    def compute_host_sum(self, layer: int, experts: list[int], x: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor | None:
        """sum_g weights[:, g] * expert_{experts[g]}(x) -> [n, D], the same bits as layers.moe.combine of
        compute_host_many's result; None where that would not run from the repacked copy."""
        if x.shape[0] < PREFILL_TOKENS and self.raw_int8[layer]:
            return torch.from_numpy(self._raw_int8(layer, experts, host_f32(x), host_f32(weights))).to(x.dtype)
        packed = self._packed_layer(layer) if x.shape[0] < PREFILL_TOKENS else None
        if packed is None:
            return None
        y = ck.ffn_experts_sum(host_f32(x).numpy(), *packed, experts, host_f32(weights).numpy())
        return torch.from_numpy(y).to(x.dtype)

    def compute_host_grouped(self, layer: int, experts: list[int], x: torch.Tensor,
                             counts: list[int]) -> torch.Tensor | None:
        """Prefill: each expert on its own counts[g] rows of x -> [sum(counts), D], in one kernel call for layers
        read in place with 8-bit activations (each expert's rows as compute_host gives them there); None elsewhere,
        and where an expert has so many tokens that compute_host takes a matrix product for it."""
        if not self.raw_int8[layer] or max(counts) >= PREFILL_TOKENS:
            return None
        y = ck.ffn_raw_int8_grouped(host_f32(x).numpy(), *(t.raw for t in self.layers[layer]), self.types[layer],
                                    experts, counts)
        return torch.from_numpy(y).to(x.dtype)  # (a no-op for float32 x)

    def _raw_int8(self, layer: int, experts: list[int], xs: torch.Tensor, weights: torch.Tensor | None = None):
        """The layer's experts from the file's bytes with 8-bit activations (kernels.cpu.ffn_raw_int8)."""
        return ck.ffn_raw_int8(xs.numpy(), *(t.raw for t in self.layers[layer]), self.types[layer], experts,
                               None if weights is None else weights.numpy())

    def new_slots(self, n: int, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            lacking = sorted({t.name for lay in self.layouts.values() if lay.gpu is None for t in lay.types})
            if lacking:
                raise ConfigError(f"experts of type {', '.join(lacking)} have no GPU kernel"
                                  f"{'' if gk else ' (triton is not installed)'}; run this model with --device cpu")
        return torch.empty(n, self.row_bytes, dtype=torch.uint8, device=device)

    def copy_to_slot(self, slots: torch.Tensor, slot: int, layer: int, e: int) -> int:
        lay = self.layouts[layer]
        if layer in self.rows:
            slots[slot, :lay.nbytes].copy_(self.rows[layer][e], non_blocking=True)
        else:
            row = torch.zeros(lay.nbytes, dtype=torch.uint8)
            self._fill_row(row, layer, e)
            slots[slot, :lay.nbytes].copy_(row)
        return sum(lay.sizes)

    # -- streamed prefill (offload.stream): a staging buffer holds a run of a layer's experts, rows packed ------
    def new_staging(self, n: int, device: torch.device) -> torch.Tensor:
        """A flat buffer for n expert rows of any layer; `staged` views it with the layer's own row width, so a
        run of consecutive experts fills consecutive bytes and crosses in one copy."""
        return self.new_slots(n, device).view(-1)

    def staged(self, staging: torch.Tensor, layer: int) -> torch.Tensor:
        """The staging buffer as slots of `layer`: uint8 [rows, the layer's row bytes]."""
        nb = self.layouts[layer].nbytes
        return staging[:staging.numel() // nb * nb].view(-1, nb)

    def copy_experts(self, staging: torch.Tensor, row: int, layer: int, first: int, n: int, bounce=None) -> int:
        """Experts first .. first + n - 1 of `layer` into staging rows row .. row + n - 1 -> bytes copied. The
        pinned tier's rows are one copy; the mmap tier's are gathered from the file into `bounce` (pinned pieces,
        offload.stream.Bounce) and sent from there, or written in place when the staging buffer is on the host."""
        dst = self.staged(staging, layer)[row:row + n]
        if layer in self.rows:
            dst.copy_(self.rows[layer][first:first + n], non_blocking=True)
        elif bounce is not None:
            bounce.send(dst, lambda out, a: self._fill_rows(out, layer, first + a))
        elif dst.device.type == "cpu":
            self._fill_rows(dst, layer, first)
        else:
            rows = torch.empty(dst.shape, dtype=torch.uint8)
            self._fill_rows(rows, layer, first)
            dst.copy_(rows)
        return n * sum(self.layouts[layer].sizes)

    def _fill_rows(self, out: torch.Tensor, layer: int, first: int) -> None:
        """out uint8 [m, the layer's row bytes] on the host <- experts first .. first + m - 1 from the file, each
        projection of the run as one strided copy (the padding between parts is never read)."""
        m, lay = out.shape[0], self.layouts[layer]
        for t, off, size in zip(self.layers[layer], lay.offsets, lay.sizes):
            src = torch.from_numpy(np.ascontiguousarray(t.raw[first:first + m]).reshape(m, size))
            out[:, off:off + size].copy_(src)

    def copy_staged_to_slots(self, slots: torch.Tensor, slot_ids: torch.Tensor, staging: torch.Tensor,
                             rows: torch.Tensor, layer: int) -> None:
        """Cache admissions at prefill: staged rows (already on the device) into cache slots, one gather-scatter."""
        nb = self.layouts[layer].nbytes
        slots[slot_ids, :nb] = self.staged(staging, layer)[rows]

    def compute_slot(self, slots: torch.Tensor, slot: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        lay = self.layouts[layer]
        if slots.device.type == "cuda":
            row = slots[slot, :lay.gpu.nbytes]
            if x.shape[0] <= gk.MAX_TOKENS:
                return gk.expert_ffn(x, row, lay.gpu).to(x.dtype)
            # many tokens (prefill): dequantize to bf16 once, then matrix products
            shapes = ((self.inter, self.dim), (self.inter, self.dim), (self.dim, self.inter))
            g, u, d = (gk.dequantize(raw, t, shp, torch.bfloat16)
                       for raw, t, shp in zip(lay.gpu.views(row), self.types[layer], shapes))
            xb = x.to(torch.bfloat16)
            return F.linear(F.silu(F.linear(xb, g)) * F.linear(xb, u), d).to(x.dtype)
        row = slots[slot].numpy()
        raws = [row[off:off + size].reshape(t.raw.shape[1:])
                for t, off, size in zip(self.layers[layer], lay.offsets, lay.sizes)]
        return self._ffn(x, layer, lambda: raws, None)

    def compute_slots(self, slots: torch.Tensor, slot_ids: list[int], layer: int, x: torch.Tensor) -> torch.Tensor:
        """Several slots' experts on the same tokens -> [G, n, D]; one grouped launch on CUDA when it applies."""
        lay = self.layouts[layer]
        if slots.device.type == "cuda" and x.shape[0] <= gk.MAX_TOKENS and lay.gpu.nbytes == slots.shape[1]:
            ids = to_device(torch.tensor(slot_ids), slots.device)
            return gk.experts_ffn(x, slots, ids, lay.gpu).to(x.dtype)
        return torch.stack([self.compute_slot(slots, s, layer, x) for s in slot_ids])

    def compute_slots_prefill(self, slots: torch.Tensor, slot_ids: list[int], layer: int, x: torch.Tensor,
                              counts: list[int], *, grouped: bool | None = None,
                              scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
        """Each slot's expert on its own tokens: x [sum(counts), D] holds counts[g] rows for slot_ids[g], in that
        order -> [sum(counts), D] in x's dtype.

        On CUDA, when some expert has more tokens than the GEMV kernels take (or with grouped=True: CPU tensors under
        TRITON_INTERPRET=1), the experts go in chunks whose bf16 weights fit in scratch_bytes: per chunk, one
        dequantization launch and one grouped matrix product per projection (or, for types in `quant_gemm`, one
        product straight from the blocks, gate and up in one launch). Otherwise each expert runs as
        compute_slot runs it (at a few tokens, the GEMV kernels read the raw weights once and write no bf16 copy).
        """
        if not slot_ids or len(slot_ids) != len(counts) or sum(counts) != x.shape[0]:
            raise ValueError(f"{len(counts)} token counts summing to {sum(counts)} for {len(slot_ids)} slots and "
                             f"{x.shape[0]} rows of x")
        if grouped is None:
            grouped = slots.device.type == "cuda" and max(counts) > gk.MAX_TOKENS
        if not grouped:
            return torch.cat([self.compute_slot(slots, s, layer, xe) for s, xe in zip(slot_ids, x.split(counts))])
        lay = self.layouts[layer].gpu
        if lay is None:
            raise ValueError(f"layer {layer}'s expert types have no GPU kernel")
        blocks = self.quant_gemm & set(gk.QUANT_GEMM_TYPES)
        fused = lay.gate_type == lay.up_type and lay.gate_type in blocks  # from the blocks, no scratch
        down = lay.down_type in blocks
        per_expert = self.inter * self.dim  # values of one projection
        chunk = len(slot_ids) if fused and down else max(1, min(MAX_GROUPS, scratch_bytes // (2 * per_expert)))
        starts = list(range(0, len(slot_ids), chunk))
        # Group ends count from each chunk's first row. Slot ids and ends reach the device in one copy that does
        # not wait for the queue.
        ends = [n for a in starts for n in itertools.accumulate(counts[a:a + chunk])]
        meta = to_device(torch.tensor(slot_ids + ends, dtype=torch.int32), x.device)
        scratch = None if fused and down else torch.empty(min(chunk, len(slot_ids)) * per_expert,
                                                          dtype=torch.bfloat16, device=x.device)
        xb = x.to(torch.bfloat16)
        ys, row = [], 0
        for a in starts:
            b = min(a + chunk, len(slot_ids))
            ids, offs, n = meta[a:b], meta[len(slot_ids) + a:len(slot_ids) + b], ends[b - 1]
            group = (slots, ids, lay, offs, counts[a:b], scratch)
            xs = xb[row:row + n]
            if fused:
                h = gk.grouped_gate_up(xs, slots, ids, counts[a:b], lay)
            else:
                h = F.silu(self._grouped_proj(xs, "gate", *group)) * self._grouped_proj(xs, "up", *group)
            ys.append(gk.grouped_gemm(h, slots, ids, counts[a:b], lay, "down") if down
                      else self._grouped_proj(h, "down", *group))
            row += n
        return (torch.cat(ys) if len(ys) > 1 else ys[0]).to(x.dtype)

    def _grouped_proj(self, a: torch.Tensor, part: str, slots: torch.Tensor, ids: torch.Tensor, lay: gk.SlotLayout,
                      offs: torch.Tensor, counts: list[int], scratch: torch.Tensor) -> torch.Tensor:
        """a [n, K] (counts[g] rows for the expert in slots[ids[g]]) through each expert's `part`, its weights
        dequantized into the scratch -> [n, N]."""
        rows, cols = (self.dim, self.inter) if part == "down" else (self.inter, self.dim)
        w = gk.dequantize_slots(slots, ids, lay, part, out=scratch[:len(counts) * rows * cols].view(-1, rows, cols))
        return self._grouped_linear(a, w, offs, counts)

    def _grouped_linear(self, a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """a [n, K] bf16 with counts[g] rows for expert g, w [G, N, K] bf16 -> [n, N]: each expert's rows @ w[g].T.
        One torch._grouped_mm; where it fails at its first use on a device (it needs sm90 on CUDA), one F.linear
        per expert there from then on."""
        ok = self.grouped_mm_ok.get(a.device)
        if ok is not False:
            try:
                y = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
            except (RuntimeError, NotImplementedError) as err:
                if ok or isinstance(err, torch.OutOfMemoryError):
                    raise
                warnings.warn(f"torch._grouped_mm does not run on {a.device} ({err}); prefill experts take one "
                              "matrix product each there", RuntimeWarning, stacklevel=2)
                self.grouped_mm_ok[a.device] = False
            else:
                self.grouped_mm_ok[a.device] = True
                return y
        return torch.cat([F.linear(ag, wg) for ag, wg in zip(a.split(counts), w)])

    def graph_slots(self, slots: torch.Tensor, layer: int) -> bool:
        """Whether compute_slots_graph serves this layer's slots (for a decode step's few tokens)."""
        return slots.device.type == "cpu" or self.layouts[layer].gpu.nbytes == slots.shape[1]

    def compute_slots_graph(self, slots: torch.Tensor, slot_ids: torch.Tensor, layer: int,
                            x: torch.Tensor) -> torch.Tensor | None:
        """As compute_slots with the slot ids already on the device (no host work, so it can be graph-captured);
        None where that path does not apply. A negative id is an expert computed elsewhere: its rows are not
        computed (zeros on the CPU stand-in, unwritten on a GPU)."""
        if slots.device.type == "cpu":  # the CPU standing in for a GPU: nothing to capture, same results
            ids = slot_ids.tolist()
            ys = x.new_zeros(len(ids), x.shape[0], x.shape[1])  # negative ids: computed elsewhere
            valid = [g for g, s in enumerate(ids) if s >= 0]
            if valid:
                ys[valid] = self.compute_slots(slots, [ids[g] for g in valid], layer, x)
            return ys
        if x.shape[0] > gk.MAX_TOKENS or not self.graph_slots(slots, layer):
            return None
        return gk.experts_ffn(x, slots, slot_ids, self.layouts[layer].gpu).to(x.dtype)

    def host_task_weights(self, layer: int) -> tuple | None:
        """(gate, up, down raw stacked arrays, their types) where a decode step's CPU experts of this layer can run
        as a C-callable task (`kernels.cpu.host_task`: the file's bytes with 8-bit activations, the kernels of
        compute_host_sum here), else None."""
        if not self.raw_int8[layer]:
            return None
        raws = tuple(t.raw for t in self.layers[layer])
        if not all(isinstance(r, np.ndarray) and r.ndim == 3 and r.flags.c_contiguous for r in raws):
            return None
        return raws, self.types[layer]

    def will_need(self, layer: int, experts: list[int]) -> None:
        """mmap tier: read predicted experts ahead (madvise WILLNEED on their byte ranges)."""
        if self.tier != "mmap":
            return
        for e in experts:
            for t in self.layers[layer]:
                will_need(t.raw[e].ctypes.data, t.raw[e].nbytes)
