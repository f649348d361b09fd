"""Router-predicted prefetch: after layer L, apply the next MoE layer's router to L's hidden state, predict the
top (k + margin) experts, and ask for the missing ones to be copied ahead of use. Records recall and precision.

On CUDA the predicted ids come back without a host sync: a copy into pinned memory and an event. The offload engine
collects them when the predicted layer starts its experts (`collect`), which is after that layer's attention has been
queued, so the GPU is not left idle while the host waits, and the copies still overlap the attention."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..layers.moe import route, router_logits


@dataclass(slots=True)
class LayerQuality:
    steps: int = 0
    actual: int = 0  # experts actually used, summed over steps
    hit_k: int = 0  # of those, predicted within the top k
    hit_km: int = 0  # of those, predicted within the top k + margin
    predicted: int = 0  # experts predicted (k + margin per token, as a set), summed over steps

    def as_dict(self) -> dict:
        return {"recall_k": self.hit_k / max(1, self.actual), "recall_k_margin": self.hit_km / max(1, self.actual),
                "precision": self.hit_km / max(1, self.predicted), "steps": self.steps}


@dataclass
class Prefetcher:
    model: object  # the Transformer; its blocks hold each MoE layer's ffn_norm and router
    margin: int = 2
    max_tokens: int = 4  # predict only for small steps (decode); prefill is served by copy decisions
    on_predict: Callable[[int, list[int]], None] | None = None
    quality: dict[int, LayerQuality] = field(default_factory=dict)
    _pending: dict[int, tuple[set[int], set[int]]] = field(default_factory=dict)
    _reading: dict[int, tuple[torch.Tensor, object]] = field(default_factory=dict)  # layer -> (pinned ids, event)

    def __post_init__(self):
        # Predict MoE layer j from the hidden state after layer j - 1.
        self._next = {j - 1: j for j in self.model.moe_layers() if j >= 1}

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        target = self._next.get(layer)
        if target is None:
            return
        x = hidden.reshape(-1, hidden.shape[-1])
        if x.shape[0] > self.max_tokens:
            return
        ffn = self.model.layers[target].ffn
        x = x.to(ffn.router.device)  # the next MoE layer may sit on the next GPU
        with torch.no_grad():
            h = self.model.layers[target].ffn_norm(x)
            logits = router_logits(h, ffn.router)
            k = ffn.spec.top_k
            wide = replace(ffn.spec, top_k=min(ffn.spec.n_experts, k + self.margin))
            ids, _ = route(logits, wide, ffn.router_bias)
        done = None
        if ids.device.type == "cuda":
            done = torch.cuda.Event()
            ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids, non_blocking=True)
            done.record(torch.cuda.current_stream(ffn.router.device))
        self._reading[target] = (ids, done)

    def collect(self, layer: int) -> None:
        """Act on the prediction for `layer`, if one was made (waiting for its ids where they are still on their way
        from the GPU): ask for its copies and keep it for the recall bookkeeping."""
        got = self._reading.pop(layer, None)
        if got is not None:
            if got[1] is not None:
                got[1].synchronize()
            self._predicted(layer, got[0])

    def _predicted(self, target: int, ids: torch.Tensor) -> None:
        """ids [N, k + margin] on the host, each token's ranking."""
        k = self.model.layers[target].ffn.spec.top_k
        top_k = set(ids[:, :k].flatten().tolist())
        top_km = set(ids.flatten().tolist())
        self._pending[target] = (top_k, top_km)
        if self.on_predict is not None:
            # most confident first: each token's ranking, interleaved
            order = list(dict.fromkeys(ids.t().flatten().tolist()))
            self.on_predict(target, order)

    def record(self, layer: int, actual: set[int]) -> None:
        pred = self._pending.pop(layer, None)
        if pred is None:
            return
        q = self.quality.setdefault(layer, LayerQuality())
        q.steps += 1
        q.actual += len(actual)
        q.hit_k += len(actual & pred[0])
        q.hit_km += len(actual & pred[1])
        q.predicted += len(pred[1])

    def summary(self) -> dict[int, dict]:
        return {layer: q.as_dict() for layer, q in sorted(self.quality.items())}
