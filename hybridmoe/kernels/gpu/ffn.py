"""One routed expert's FFN, down(silu(gate(x)) * up(x)), from raw GGUF bytes, and the slot layout that holds them.

A slot is one contiguous uint8 row per expert, so a slot buffer is a plain [n_slots, nbytes] tensor, filling a
slot is three copies (or one, from a host buffer packed the same way), and the kernels address slot s as
base + s * nbytes:

    bytes [gate_offset, gate_offset + gate_nbytes)   gate: I rows of D values, raw GGUF blocks of gate_type
    bytes [up_offset,   up_offset + up_nbytes)       up:   I rows of D values, raw GGUF blocks of up_type
    bytes [down_offset, down_offset + down_nbytes)   down: D rows of I values, raw GGUF blocks of down_type

Each part starts on a multiple of ALIGN bytes (zero padding between), and nbytes is a multiple of ALIGN, so
every part of every slot stays aligned for vector loads. Letters: D hidden, I expert hidden, n tokens, G experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from hybridmoe.quant import get_format

from . import checks, decode, dequant

ALIGN = 256
PARTS = ("gate", "up", "down")
Raw = torch.Tensor | np.ndarray


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Byte ranges of gate, up and down inside one expert's slot row (see the module docstring)."""

    hidden: int
    inter: int
    gate_type: T
    up_type: T
    down_type: T
    gate_offset: int = field(init=False)
    up_offset: int = field(init=False)
    down_offset: int = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("gate_type", "up_type", "down_type"):
            object.__setattr__(self, name, checks.kernel_type(getattr(self, name)))
        if self.hidden <= 0 or self.inter <= 0:
            raise ValueError(f"hidden and inter must be positive, got {self.hidden}, {self.inter}")
        up = _align(self.gate_nbytes)
        down = up + _align(self.up_nbytes)
        object.__setattr__(self, "gate_offset", 0)
        object.__setattr__(self, "up_offset", up)
        object.__setattr__(self, "down_offset", down)
        object.__setattr__(self, "nbytes", down + _align(self.down_nbytes))

    @property
    def gate_nbytes(self) -> int:  # row_bytes raises if D is not whole blocks
        return self.inter * get_format(self.gate_type).row_bytes(self.hidden)

    @property
    def up_nbytes(self) -> int:
        return self.inter * get_format(self.up_type).row_bytes(self.hidden)

    @property
    def down_nbytes(self) -> int:
        return self.hidden * get_format(self.down_type).row_bytes(self.inter)

    def parts(self) -> tuple[tuple[int, int, int, T], ...]:
        """(offset, rows, row_bytes, type) of gate, up, down."""
        rb_d = lambda q: get_format(q).row_bytes(self.hidden)  # noqa: E731
        return ((self.gate_offset, self.inter, rb_d(self.gate_type), self.gate_type),
                (self.up_offset, self.inter, rb_d(self.up_type), self.up_type),
                (self.down_offset, self.hidden, get_format(self.down_type).row_bytes(self.inter), self.down_type))

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One slot row (uint8 [nbytes]) -> its (gate [I, rb], up [I, rb], down [D, rb]) views, no copy."""
        if slot.dtype != torch.uint8 or slot.shape != (self.nbytes,):
            raise ValueError(f"a slot is uint8 [{self.nbytes}], got {slot.dtype} {tuple(slot.shape)}")
        return tuple(slot[o:o + n * rb].view(n, rb) for o, n, rb, _ in self.parts())  # type: ignore[return-value]

    def pack(self, gate: Raw, up: Raw, down: Raw, out: torch.Tensor | None = None) -> torch.Tensor:
        """Write raw gate, up, down (uint8, any shape of the right size) into `out` (a new CPU row if None)."""
        out = torch.zeros(self.nbytes, dtype=torch.uint8) if out is None else out
        for dst, src, name in zip(self.views(out), (gate, up, down), ("gate", "up", "down")):
            src = torch.as_tensor(src)
            if src.dtype != torch.uint8 or src.numel() != dst.numel():
                raise ValueError(f"{name}: expected {dst.numel()} uint8 bytes, got {src.dtype} x {src.numel()}")
            dst.copy_(src.reshape(dst.shape), non_blocking=True)
        return out


def expert_ffn(x: torch.Tensor, weights: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               layout: SlotLayout, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [n, D] -> down(silu(gate(x)) * up(x)) [n, D] for one expert.

    `weights` is a slot row (uint8 [layout.nbytes]) or the three raw tensors (gate [I, rb], up [I, rb],
    down [D, rb]). The hidden activation stays float32; the output is out_dtype (default x's dtype).
    """
    if isinstance(weights, torch.Tensor):
        checks.device_of("slot", weights)
        layout.views(weights)  # checks dtype and size
        if weights.data_ptr() % 16:
            raise ValueError("a slot must start at a 16-byte aligned address (for vector loads)")
        mats = [(weights[off:], 0, qtype) for off, _, _, qtype in layout.parts()]
        return _ffn(x, mats, None, 1, layout, out_dtype)[0]
    if len(weights) != 3:
        raise ValueError("weights must be a slot row or a (gate, up, down) tuple")
    mats = []
    for w, (_, rows, _, qtype), name in zip(weights, layout.parts(), ("gate", "up", "down")):
        k_dim = layout.inter if name == "down" else layout.hidden
        checks.raw_weight(name, w, qtype, k_dim)
        if w.shape[0] != rows:
            raise ValueError(f"{name} has {w.shape[0]} rows, the layout says {rows}")
        mats.append((w, 0, qtype))
    return _ffn(x, mats, None, 1, layout, out_dtype)[0]


def experts_ffn(x: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, layout: SlotLayout,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The FFN of the G experts in slots[ids] (uint8 [n_slots, nbytes], ids [G]) in two launches -> [G, n, D].

    x is [n, D] (every expert sees the same tokens) or [G, n, D]. Outputs are per expert, not combined, so the
    caller sums them in a fixed order. ids are not range-checked (that needs a host sync); a negative id skips its
    expert (its rows of the result are left unwritten).
    """
    device = checks.device_of("slots", slots)
    if slots.dtype != torch.uint8 or slots.dim() != 2 or slots.shape[1] != layout.nbytes:
        raise ValueError(f"slots must be uint8 [n_slots, {layout.nbytes}], got {slots.dtype} {tuple(slots.shape)}")
    checks.contiguous("slots", slots)
    if slots.data_ptr() % 16:
        raise ValueError("slots must start at a 16-byte aligned address (for vector loads)")
    checks.slot_ids(ids, slots.shape[0], device)
    flat = slots.view(-1)
    mats = [(flat[off:], layout.nbytes, qtype) for off, _, _, qtype in layout.parts()]
    return _ffn(x, mats, ids, ids.shape[0], layout, out_dtype)


def dequantize_slots(slots: torch.Tensor, ids: torch.Tensor, layout: SlotLayout, part: str,
                     dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """One projection ("gate", "up" or "down") of the G experts in slots[ids], dequantized in one launch.

    -> [G, I, D] for gate and up, [G, D, I] for down; each matrix as `dequantize` gives it (float32: bit-exact).
    slots is uint8 [n_slots, row >= layout.nbytes] with each expert in the first layout.nbytes bytes of its row
    (layers of a mixed quantization share wider rows); ids [G] are not range-checked (that needs a host sync).
    `out`, when given, is the contiguous [G, rows, K] tensor of `dtype` to fill (scratch reused across calls).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    device = checks.device_of("slots", slots)
    if slots.dtype != torch.uint8 or slots.dim() != 2 or slots.shape[1] < layout.nbytes:
        raise ValueError(f"slots must be uint8 [n_slots, >= {layout.nbytes}], got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    checks.contiguous("slots", slots)
    if slots.data_ptr() % 16 or slots.shape[1] % 16:
        raise ValueError("slots must start at a 16-byte aligned address and have rows of a multiple of 16 bytes "
                         "(for vector loads)")
    checks.slot_ids(ids, slots.shape[0], device)
    offset, rows, row_bytes, qtype = layout.parts()[PARTS.index(part)]
    k_dim = layout.inter if part == "down" else layout.hidden
    shape = (ids.shape[0], rows, k_dim)
    dtype = checks.out_dtype(dtype, dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        checks.device_of("out", out, device)
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out must be {dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
        checks.contiguous("out", out)
    dequant.launch(slots.view(-1)[offset:], out, int(qtype), row_bytes=row_bytes, stride_we=slots.shape[1], ids=ids)
    return out


def _ffn(x: torch.Tensor, mats: list, ids: torch.Tensor | None, n_mats: int, layout: SlotLayout,
         out_dtype: torch.dtype | None) -> torch.Tensor:
    """mats: (base tensor, bytes between experts, type) of gate, up, down."""
    device = mats[0][0].device
    checks.device_of("x", x, device)
    if x.dim() == 3:
        if x.shape[0] != n_mats:
            raise ValueError(f"x has activations for {x.shape[0]} experts, {n_mats} were asked for")
        checks.activations(x[0], layout.hidden)
        checks.contiguous("x", x)
        x3 = x
    else:
        x3 = checks.activations(x, layout.hidden).expand(n_mats, -1, -1)
    n_tok = x3.shape[1]
    dtype = checks.out_dtype(out_dtype, x.dtype)
    (gate, g_stride, g_type), (up, u_stride, u_type), (down, d_stride, d_type) = mats
    h = torch.empty(n_mats, n_tok, layout.inter, dtype=torch.float32, device=device)
    if g_type == u_type and g_stride == u_stride:
        decode.launch(x3, gate, h, int(g_type), n_rows=layout.inter, k_dim=layout.hidden,
                      stride_we=g_stride, ids=ids, w2=up)
    else:  # gate and up quantized differently: one launch each, silu(g) * u in torch
        u = torch.empty_like(h)
        decode.launch(x3, gate, h, int(g_type), n_rows=layout.inter, k_dim=layout.hidden,
                      stride_we=g_stride, ids=ids)
        decode.launch(x3, up, u, int(u_type), n_rows=layout.inter, k_dim=layout.hidden,
                      stride_we=u_stride, ids=ids)
        h = F.silu(h) * u
    y = torch.empty(n_mats, n_tok, layout.hidden, dtype=dtype, device=device)
    decode.launch(h, down, y, int(d_type), n_rows=layout.hidden, k_dim=layout.inter, stride_we=d_stride,
                  ids=ids)
    return y

