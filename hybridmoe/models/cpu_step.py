"""A CPU decode step through every decoder block with a few Python operations per layer.

With the default 8-bit activations each block of a CPU decode step is two kernel calls (its attention half,
kernels.cpu.AttentionHalf, and its MoE layer, kernels.cpu.MoEBlock). Around them the step still made about a hundred
Python calls per layer (module calls, checks, tensor and array conversions, the kernels' arguments rebuilt), each
slow right after a kernel has streamed megabytes of weights through the caches. `CPUDecodePlan` gathers every
layer's arguments once and then calls the same kernels, on the same inputs in the same order (so the same bits),
from buffers it owns. Dense feed-forward layers (DeepSeek's first ones) are called as modules.
"""
from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from ..kernels.cpu.api import _NO_ROWS
from ..kernels.cpu.checks import activations
from ..layers.cache import Batch, KVCache

class _Layer:
    """One block resolved: its attention module, the attention half's kernel with its fixed arguments around the
    per-step ones (`split_args`), then the MoE kernel with its arguments and outputs, or the dense feed-forward
    module. `made` holds what the model's modules must still hold for the plan to be current."""

    __slots__ = ("index", "attn", "block", "half", "norms", "head", "mid", "tail", "scale", "moe", "moe_args", "ids",
                 "weights", "ffn", "made")

    def __init__(self, index: int, block, half, moe, moe_made):
        self.index, self.attn, self.block = index, block.attn, half.block
        self.half, self.norms = half.block.half_kernel, half.norms
        self.head, self.mid, self.tail = half.block.split_args()
        self.scale = None  # the attention's scale as the kernel takes it (float32), set by the plan's check
        self.moe = self.ffn = None
        if moe is not None:
            self.moe, self.moe_args = moe.kernel, (*moe.routing, *moe.routed, *moe.shared)
            self.ids = np.empty((1, moe.top_k), dtype=np.int64)
            self.weights = np.empty((1, moe.top_k), dtype=np.float32)
        else:
            self.ffn = block.ffn
        self.made = (block.ffn, moe_made)


class CPUDecodePlan:
    """Every block of a model resolved for CPU decode steps (one row, one token, float32 on the CPU). `of` makes one
    where every block's attention half runs in one call (Block.cpu_half) and every feed-forward half is a MoE layer
    in one call (MoE.cpu_block) or a dense module; `current` tells whether the model still holds what it was made
    from. Called, it runs the blocks and returns what `Transformer._layers` returns."""

    def __init__(self, model, layers: list[_Layer]):
        self.layers = layers
        self.experts = model.experts
        self.dim = model.norm.weight.shape[0]
        self.embedding = activations(model.tok_embeddings.weight.detach())
        self.checked = None  # a weak reference to the KV cache whose arrays every block has checked
        self.x = [np.empty((1, self.dim), dtype=np.float32) for _ in range(2)]
        self.out = [np.empty((1, self.dim), dtype=np.float32) for _ in range(2)]
        self.h = np.empty((1, self.dim), dtype=np.float32)

    @classmethod
    def of(cls, model) -> "CPUDecodePlan | None":
        if model.layer_devices is not None and any(d.type != "cpu" for d in model.layer_devices):
            return None
        weight = model.tok_embeddings.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
            return None
        layers = []
        for i, block in enumerate(model.layers):
            half = block.cpu_half()
            routed = getattr(block.ffn, "cpu_block", None)  # a MoE layer's; dense modules have none
            moe = routed(i, model.experts) if routed is not None else None
            if half is None or (moe is None and routed is not None):
                return None
            layers.append(_Layer(i, block, half, moe, block.ffn.__dict__.get("_cpu_block")))
        return cls(model, layers)

    def current(self, model) -> bool:
        """Whether the model still has the experts object and every block the plan was made from."""
        return model.experts is self.experts and all(
            lay.attn.__dict__.get("_cpu_block") is lay.block and lay.made[0].__dict__.get("_cpu_block") is lay.made[1]
            for lay in self.layers)

    def _check(self, cache: KVCache, batch: Batch, cos, sin) -> None:
        """Every block's arguments checked once per KV cache, as the blocks check them at each call."""
        for lay in self.layers:
            step = lay.attn.cpu_step(batch, cache.layers[lay.index])
            lay.block.args(cos, sin, *step)
            lay.scale = np.float32(step[-1])
        self.checked = weakref.ref(cache)

    def __call__(self, tokens: torch.Tensor, batch: Batch, cache: KVCache, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [1, 1] on the CPU; batch one decode row (`Batch.sees_all`); cos, sin at its position -> (x after
        the last block's attention half, the last block's feed-forward output), each [1, 1, D]."""
        if self.checked is None or self.checked() is not cache:
            self._check(cache, batch, cos, sin)
        if not 0 <= batch.start[0] < cache.max_len:
            raise ValueError(f"position {batch.start[0]} is outside a cache of {cache.max_len}")
        token = int(tokens[0, 0])
        if not 0 <= token < self.embedding.shape[0]:
            raise IndexError(f"token id {token} is outside the vocabulary of {self.embedding.shape[0]}")
        x, pending, h = self.embedding[token:token + 1], _NO_ROWS, self.h  # no pending output yet
        c, s = cos.numpy().reshape(-1), sin.numpy().reshape(-1)
        ran = []
        for n, lay in enumerate(self.layers):
            x_out, out = self.x[n % 2], self.out[n % 2]
            cache_a, cache_b, pos, _ = lay.attn.cpu_step(batch, cache.layers[lay.index])
            lay.half(x, pending, *lay.norms, x_out, h, *lay.head, c, s, *lay.mid, cache_a, cache_b, pos, lay.scale,
                     *lay.tail)
            if lay.moe is not None:
                t0 = time.perf_counter()
                lay.moe(h, *lay.moe_args, lay.ids, lay.weights, out)
                ran.append((lay.index, lay.ids, time.perf_counter() - t0))
            else:
                out = activations(lay.ffn(torch.from_numpy(h).view(1, 1, self.dim)).reshape(1, self.dim))
            x, pending = x_out, out
        for index, ids, seconds in ran:
            self.experts.ran(index, ids[0].tolist(), seconds)
        return torch.from_numpy(x).view(1, 1, self.dim), torch.from_numpy(pending).view(1, 1, self.dim)
