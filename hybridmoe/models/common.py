"""Pieces every model family shares: config access with clear errors, rope settings, the decoder stack."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import cpu as ck
from ..layers.cache import Batch, KVCache
from ..layers.moe import Experts, RouterSpec, cpu_routing, route_hidden
from ..layers.mlp import MLP
from ..layers.norm import RMSNorm
from ..layers.rope import Rope, RopeTables
from .cpu_step import CPUDecodePlan


def need(cfg: dict, key: str, *aliases: str):
    """cfg[key], or the first alias present (transformers renames some keys when it re-serialises a config)."""
    for k in (key, *aliases):
        if cfg.get(k) is not None:
            return cfg[k]
    raise ConfigError(f"config.json: missing required key {key!r} for model_type {cfg.get('model_type')!r}")


def rope_from_config(cfg: dict, dim: int, interleaved: bool) -> Rope:
    """Both config forms: upstream `rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    merged["rope_type"] = kind
    return Rope(dim=dim, theta=float(theta), scaling={} if kind == "default" else merged, interleaved=interleaved,
                max_positions=int(cfg.get("max_position_embeddings") or 4096))


def check_act(cfg: dict) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only silu)")


def on_device(dev: torch.device):
    """Make `dev` the current CUDA device (kernels that are not torch's, e.g. Triton's, launch on the current
    device); a no-op on the CPU."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


class MoE(nn.Module):
    """Router + optional shared expert. Routed experts are computed by an Experts object the block does not own."""

    def __init__(self, dim: int, spec: RouterSpec, shared_hidden: int = 0, router_bias: bool = False,
                 shared_gate: bool = False):
        super().__init__()
        self.spec = spec
        self.router = nn.Parameter(torch.empty(spec.n_experts, dim, dtype=torch.float32))
        self.router_bias = nn.Parameter(torch.empty(spec.n_experts, dtype=torch.float32)) if router_bias else None
        self.shared = MLP(dim, shared_hidden) if shared_hidden else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self._cpu_block: tuple | None = None  # (the experts object, its kernels.cpu.MoEBlock or None): cpu_block

    def forward(self, x: torch.Tensor, layer: int, experts: Experts, device_only: bool = False) -> torch.Tensor:
        """device_only: one token through a layer whose experts are queued as device work (`Experts.start_device`),
        as captured decode graphs run it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        block = self.cpu_block(layer, experts) if x.shape[0] == 1 and x.dtype == torch.float32 and \
            x.device.type == "cpu" and x.is_contiguous() and not device_only else None
        if block is not None:  # one CPU decode token: router, experts and shared expert in one kernel call
            t0 = time.perf_counter()
            y, chosen = block(x)
            experts.ran(layer, chosen, time.perf_counter() - t0)
            return y.view(shape)
        ids, weights = self.route(x)
        finish = (experts.start_device if device_only else experts.start)(layer, x, ids, weights)
        s = self.shared_out(x)  # runs while CPU-served experts are computed
        return self.combine(finish(), s).view(shape)

    def cpu_block(self, layer: int, experts) -> "ck.MoEBlock | None":
        """This layer's one-token CPU step in one kernel call (kernels.cpu.MoEBlock), where the experts object
        offers the file's bytes with 8-bit activations (`decode_weights`), the router is float32 and the shared
        expert, if any, is an ungated 8-bit fused MLP; else None. Made on first use, for that experts object."""
        made = self._cpu_block
        if made is not None and made[0] is experts:
            return made[1]
        block = None
        got = getattr(experts, "decode_weights", lambda _: None)(layer)
        shared = self.shared.fused if self.shared is not None else None
        bias = self.router_bias
        if (got is not None and self.shared_gate is None and (self.shared is None or shared is not None)
                and self.router.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)):
            block = ck.MoEBlock(self.router, *got, None if shared is None else tuple(shared.weights),
                                **cpu_routing(self.spec, bias))
        self._cpu_block = (experts, block)
        return block

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared is None:
            return None
        s = self.shared(x)
        return s if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * s

    @staticmethod
    def combine(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return routed if shared is None else routed + shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] (already normalised) -> (ids [N, K], weights [N, K] f32)."""
        return route_hidden(x, self.router, self.spec, self.router_bias)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module, dim: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = ffn
        self._cpu_half: tuple | None = None  # (the attention's cpu_block, its kernels.cpu.AttentionHalf or None)

    def forward(self, x, layer, batch, cos, sin, cache, experts, pending=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x after attention, the feed-forward output still to be added to it). pending: the previous block's
        such output; it is added inside this block's first norm (at CPU decode, one kernel call for both)."""
        x, h = self.attend(x, batch, cos, sin, cache, pending)
        return x, self.ffn(h, layer, experts) if isinstance(self.ffn, MoE) else self.ffn(h)

    def attend(self, x, batch, cos, sin, cache, pending=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: (x after attention, the normalised input of the feed-forward half)."""
        if batch.one_cpu_token(x, cache) and (pending is None or (
                pending.dtype == torch.float32 and pending.device.type == "cpu" and pending.is_contiguous())):
            half = self.cpu_half()
            if half is not None:  # one CPU decode token: the residual adds, both norms and the attention in one call
                return half(x, pending, cos, sin, *self.attn.cpu_step(batch, cache))
        x, normed = (x, self.attn_norm(x)) if pending is None else self.attn_norm.add(x, pending)
        return self.ffn_norm.add(x, self.attn(normed, batch, cos, sin, cache))

    def cpu_half(self) -> "ck.AttentionHalf | None":
        """`attend` of one CPU decode token as one kernel call (kernels.cpu.AttentionHalf) where the attention has a
        CPU decode block and both norms are float32 on the CPU, else None. Made on first use, and again when the
        attention's block is remade."""
        block = getattr(self.attn, "cpu_block", lambda: None)()
        made = self._cpu_half
        if made is None or made[0] is not block:
            norms = (self.attn_norm, self.ffn_norm)
            fits = block is not None and all(n.weight.dtype == torch.float32 and n.weight.device.type == "cpu"
                                             for n in norms)
            made = self._cpu_half = (block, ck.AttentionHalf(block, *(t for n in norms for t in (n.weight.detach(),
                                                                                               n.eps)))
                                     if fits else None)
        return made[1]


class Transformer(nn.Module):
    """Embedding, decoder blocks, final norm and output head. Families differ only in the blocks they build."""

    def __init__(self, vocab: int, dim: int, eps: float, blocks: list[Block], rope: Rope, tie: bool = False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.tie = tie
        self.rope = rope
        self.rope_tables: dict[torch.device, RopeTables] = {}
        self.experts: Experts | None = None  # set by the loader; not a submodule
        # Pipeline stages: the device of each layer (None: all on the output head's device). Only the hidden
        # state crosses between stages.
        self.layer_devices: list[torch.device] | None = None
        # Called as f(layer, hidden) after each layer; used by the prefetcher, never changes results.
        self.observers: list[Callable[[int, torch.Tensor], None]] = []
        self.decode_graphs = None  # models.graphs.DecodeGraphs, set by the loader on CUDA
        self._cpu_plan: CPUDecodePlan | None = None  # cpu_decode_plan
        self._cache: KVCache | None = None

    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.layers) if isinstance(b.ffn, MoE)]

    def cache_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return [b.attn.cache_shapes() for b in self.layers]

    def devices(self) -> list[torch.device]:
        return self.layer_devices or [self.norm.weight.device] * len(self.layers)

    def new_cache(self, n_slots: int, max_len: int) -> KVCache:
        """A KV cache for `n_slots` sequences of up to `max_len` tokens. The last one is reused when it is large
        enough (stale entries are never attended to), which keeps captured decode graphs valid across calls."""
        old = self._cache
        if old is not None and old.n_slots == n_slots and old.max_len >= max_len:
            return old
        self._cache = None  # free the old one before allocating
        self._cache = KVCache(self.cache_shapes(), n_slots, max_len, self.norm.weight.dtype, self.devices())
        return self._cache

    def tables(self, dev: torch.device) -> RopeTables:
        return self.rope_tables.get(dev) or self.rope_tables.setdefault(dev, RopeTables(self.rope, dev))

    def forward(self, tokens: torch.Tensor, batch: Batch, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (f32), or [B, V] at each row's last valid token if last_only."""
        graphs = self.decode_graphs
        got = graphs.run(tokens, batch, cache) if graphs is not None and graphs.applies(tokens, batch, cache) else None
        if got is not None and got[1]:  # the graphs ran the head too: [1, 1, V], in a buffer the next step reuses
            return (got[0][:, 0] if last_only else got[0]).clone()
        x, pending = (got[0], None) if got is not None else self._layers(tokens, batch, cache)
        dev = self.norm.weight.device  # the final norm lives with the head (which may be quantized)
        one = last_only and x.shape[:2] == (1, 1)
        if pending is not None and (not one or pending.device != x.device or x.device != dev):
            x, pending = x + pending, None
        x = x.to(dev)
        if one:
            x = x[:, 0]
            pending = None if pending is None else pending[:, 0]
        elif last_only:
            last = torch.tensor([n - 1 for n in batch.n_new], device=x.device)
            x = x[torch.arange(x.shape[0], device=x.device), last]
        x = self.norm(x) if pending is None else self.norm.add(x, pending)[1]
        return self.output(x).float()

    def cpu_decode_plan(self, tokens: torch.Tensor, batch: Batch, cache: KVCache | None) -> CPUDecodePlan | None:
        """The model's CPU decode plan (models.cpu_step) where this call is one: one row's one token on the CPU with
        a cache and no observers, every block taking its one-call CPU kernels; else None. Made again when a block
        or the experts object changes."""
        if (cache is None or self.observers or tokens.shape != (1, 1) or tokens.device.type != "cpu"
                or not batch.sees_all):
            return None
        plan = self._cpu_plan
        if plan is None or not plan.current(self):
            plan = self._cpu_plan = CPUDecodePlan.of(self)
        return plan

    def _layers(self, tokens: torch.Tensor, batch: Batch,
                cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x, the last block's output still to be added to it, or None)."""
        plan = self.cpu_decode_plan(tokens, batch, cache)
        if plan is not None:  # a CPU decode step: every block's kernels called from one resolved plan
            return plan(tokens, batch, cache, *self.tables(tokens.device).cos_sin(batch.positions))
        x = self.tok_embeddings(tokens.to(self.tok_embeddings.weight.device))
        pending = None
        stage = None
        for i, (block, dev) in enumerate(zip(self.layers, self.devices())):
            if dev != stage:  # entering a new pipeline stage: only the whole hidden state crosses
                if pending is not None:
                    x, pending = x + pending, None
                stage, x, b = dev, x.to(dev), batch.to(dev)
                cos, sin = self.tables(dev).cos_sin(b.positions)
            with on_device(dev):
                x, pending = block(x, i, b, cos, sin, None if cache is None else cache.layers[i], self.experts,
                                   pending)
            if self.observers:
                x, pending = x + pending, None
                for observe in self.observers:
                    observe(i, x)
        return x, pending
