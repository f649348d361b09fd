"""The interface every host tier of routed experts offers the offload engine: DenseStore (float weights of HF
checkpoints, store.py) and QuantStore (GGUF blocks, quant_store.py). Experts are addressed as (layer, expert);
`slots` is what new_slots returned for one device. tests/offload/test_store_protocol.py checks both stores against
it, signatures included."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class ExpertStore(Protocol):
    tier: str  # "mmap" or "pinned"
    n_experts: dict[int, int]  # MoE layer -> routed experts
    dim: int  # hidden size D
    inter: int  # an expert's hidden size I

    def expert_nbytes(self) -> int:
        """Host bytes of one expert (the largest layer's, where types differ by layer)."""

    def slot_nbytes(self) -> int:
        """Bytes one GPU slot takes."""

    def flops_per_token(self) -> float:
        """Of one expert for one token."""

    def compute_host(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on the CPU: x [n, D] -> [n, D]."""

    def compute_host_many(self, layer: int, experts: list[int], x: torch.Tensor) -> torch.Tensor:
        """Several experts on the same tokens on the CPU -> [G, n, D]."""

    def compute_host_sum(self, layer: int, experts: list[int], x: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor | None:
        """The experts' weighted sum in one call, or None where the store has no fused one."""

    def new_slots(self, n: int, device: torch.device) -> Any:
        """n empty GPU slots on `device`."""

    def copy_to_slot(self, slots: Any, slot: int, layer: int, e: int) -> int:
        """Copy one expert into a slot; returns bytes copied."""

    def compute_slot(self, slots: Any, slot: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        """One slot's expert on x."""

    def compute_slots(self, slots: Any, slot_ids: list[int], layer: int, x: torch.Tensor) -> torch.Tensor:
        """Several slots' experts on the same tokens -> [G, n, D]."""

    def compute_slots_prefill(self, slots: Any, slot_ids: list[int], layer: int, x: torch.Tensor,
                              counts: list[int], *, grouped: bool | None = None) -> torch.Tensor:
        """Each slot's expert on its own tokens (x holds counts[g] rows for slot_ids[g], in that order); grouped:
        force (or forbid) one grouped call per projection, None: the store chooses."""

    def new_staging(self, n: int, device: torch.device) -> Any:
        """A staging buffer of n expert rows for streamed prefill (offload.stream), for any layer."""

    def staged(self, staging: Any, layer: int) -> Any:
        """The staging buffer as slots of `layer` (what compute_slots_prefill takes)."""

    def copy_experts(self, staging: Any, row: int, layer: int, first: int, n: int, bounce=None) -> int:
        """Experts first .. first + n - 1 of `layer` into staging rows row .. row + n - 1 (through `bounce`, an
        offload.stream.Bounce, from a file tier); returns bytes copied."""

    def copy_staged_to_slots(self, slots: Any, slot_ids: torch.Tensor, staging: Any, rows: torch.Tensor,
                             layer: int) -> None:
        """Staged experts into cache slots, on the device (slot_ids and rows on the device)."""

    def graph_slots(self, slots: Any, layer: int) -> bool:
        """Whether compute_slots_graph serves this layer's slots."""

    def compute_slots_graph(self, slots: Any, slot_ids: torch.Tensor, layer: int,
                            x: torch.Tensor) -> torch.Tensor | None:
        """Slot ids on the device, no host work; None where graph_slots is False."""

    def host_task_weights(self, layer: int) -> tuple | None:
        """(raw stacked gate, up, down arrays, their types) where a decode step's CPU experts of this layer can run
        as a C-callable task (kernels.cpu.host_task), else None."""

    def will_need(self, layer: int, experts: list[int]) -> None:
        """Ask for predicted experts to be read ahead (mmap tier)."""
