"""Where each routed expert's weights live on the host, how they are computed there, and how they are copied
into (and computed from) GPU slots. Experts are addressed as (layer, expert).

DenseStore holds float weights (HF checkpoints): the "mmap" tier keeps zero-copy views of the checkpoint files, the
"pinned" tier copies each layer's experts once into one pinned buffer (pinned memory makes host-to-device copies
asynchronous and about twice as fast).
"""
from __future__ import annotations

import ctypes
import mmap

import torch

from ..layers.moe import expert_ffn

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, D], up [I, D], down [D, I]
_MADV_WILLNEED = 3


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def will_need(address: int, nbytes: int) -> None:
    """Ask the kernel to read a mapped byte range ahead (madvise WILLNEED), so NVMe reads overlap compute."""
    if _LIBC is None:
        return
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), _MADV_WILLNEED)


class SlotBuffers:
    """n slots of one expert each on one device: gate [S, I, D], up [S, I, D], down [S, D, I]."""

    def __init__(self, n: int, inter: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.gate = torch.empty(n, inter, dim, dtype=dtype, device=device)
        self.up = torch.empty(n, inter, dim, dtype=dtype, device=device)
        self.down = torch.empty(n, dim, inter, dtype=dtype, device=device)


class DenseStore:
    def __init__(self, weights: dict[int, list[ExpertWeights]], tier: str = "mmap", pin: bool = False):
        if tier not in ("mmap", "pinned"):
            raise ValueError(f"experts tier {tier!r}: use mmap or pinned")
        self.tier = tier
        self.n_experts = {layer: len(experts) for layer, experts in weights.items()}
        layer0 = next(iter(weights.values()))
        self.inter, self.dim = layer0[0][0].shape
        self.dtype = layer0[0][0].dtype
        if tier == "pinned":
            self.weights = {layer: self._pack(experts, pin) for layer, experts in weights.items()}
        else:
            self.weights = weights

    @staticmethod
    def _pack(experts: list[ExpertWeights], pin: bool) -> list[ExpertWeights]:
        """One contiguous (optionally pinned) buffer per projection for the layer's experts."""
        packed = []
        for proj in range(3):
            stack = torch.empty((len(experts), *experts[0][proj].shape), dtype=experts[0][proj].dtype,
                                pin_memory=pin)
            for e, w in enumerate(experts):
                stack[e].copy_(w[proj])
            packed.append(stack)
        return [tuple(p[e] for p in packed) for e in range(len(experts))]

    def expert_nbytes(self) -> int:
        return 3 * self.inter * self.dim * torch.finfo(self.dtype).bits // 8

    def slot_nbytes(self) -> int:
        return self.expert_nbytes()

    def flops_per_token(self) -> float:
        return 6.0 * self.inter * self.dim

    def compute_host(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, *self.weights[layer][e])

    def compute_host_many(self, layer: int, experts: list[int], x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.compute_host(layer, e, x) for e in experts])

    @staticmethod
    def compute_host_sum(layer: int, experts: list[int], x: torch.Tensor, weights: torch.Tensor) -> None:
        """No fused weighted sum for float experts: callers combine compute_host_many's outputs (QuantStore's
        has one)."""
        return None

    def new_slots(self, n: int, device: torch.device) -> SlotBuffers:
        return SlotBuffers(n, self.inter, self.dim, self.dtype, device)

    def copy_to_slot(self, slots: SlotBuffers, slot: int, layer: int, e: int) -> int:
        """Copy one expert into a slot (asynchronous on CUDA when the host tier is pinned); returns bytes copied."""
        for dst, src in zip((slots.gate, slots.up, slots.down), self.weights[layer][e]):
            dst[slot].copy_(src, non_blocking=True)
        return self.expert_nbytes()

    @staticmethod
    def compute_slot(slots: SlotBuffers, slot: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, slots.gate[slot], slots.up[slot], slots.down[slot])

    def compute_slots(self, slots: SlotBuffers, slot_ids: list[int], layer: int, x: torch.Tensor) -> torch.Tensor:
        """Several slots' experts on the same tokens -> [G, n, D]."""
        return torch.stack([self.compute_slot(slots, s, layer, x) for s in slot_ids])

    def compute_slots_prefill(self, slots: SlotBuffers, slot_ids: list[int], layer: int, x: torch.Tensor,
                              counts: list[int], *, grouped: bool | None = None) -> torch.Tensor:
        """Each slot's expert on its own tokens (x holds counts[g] rows for slot_ids[g], in that order). Float
        experts always run one matrix product each (`grouped` is QuantStore's)."""
        return torch.cat([self.compute_slot(slots, s, layer, xe) for s, xe in zip(slot_ids, x.split(counts))])

    # -- streamed prefill (offload.stream); float experts are copied one by one (GGUF experts go as runs) -------
    def new_staging(self, n: int, device: torch.device) -> SlotBuffers:
        return self.new_slots(n, device)

    @staticmethod
    def staged(staging: SlotBuffers, layer: int) -> SlotBuffers:
        return staging

    def copy_experts(self, staging: SlotBuffers, row: int, layer: int, first: int, n: int, bounce=None) -> int:
        """Experts first .. first + n - 1 of `layer` into staging rows row .. row + n - 1 -> bytes copied."""
        return sum(self.copy_to_slot(staging, row + i, layer, first + i) for i in range(n))

    @staticmethod
    def copy_staged_to_slots(slots: SlotBuffers, slot_ids: torch.Tensor, staging: SlotBuffers, rows: torch.Tensor,
                             layer: int) -> None:
        """Cache admissions at prefill: staged experts (already on the device) into cache slots."""
        for dst, src in ((slots.gate, staging.gate), (slots.up, staging.up), (slots.down, staging.down)):
            dst[slot_ids] = src[rows]

    @staticmethod
    def graph_slots(slots: SlotBuffers, layer: int) -> bool:
        """Whether compute_slots_graph serves these slots: only for the CPU standing in for a GPU (a gather of
        whole float experts would cost more on a GPU than the host sync it saves)."""
        return slots.gate.device.type == "cpu"

    def compute_slots_graph(self, slots: SlotBuffers, slot_ids: torch.Tensor, layer: int,
                            x: torch.Tensor) -> torch.Tensor | None:
        """Slot ids on the device, no host work (see graph_slots)."""
        if not self.graph_slots(slots, layer):
            return None
        return self.compute_slots(slots, slot_ids.tolist(), layer, x)

    @staticmethod
    def host_task_weights(layer: int) -> None:
        """Float experts have no C-callable CPU kernel (see QuantStore.host_task_weights)."""
        return None

    def will_need(self, layer: int, experts: list[int]) -> None:
        """mmap tier: read predicted experts ahead."""
        if self.tier != "mmap":
            return
        for e in experts:
            for t in self.weights[layer][e]:
                will_need(t.data_ptr(), t.numel() * t.element_size())
