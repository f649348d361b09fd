"""One-token decode through CUDA graphs.

Eager decode launches about ninety small kernels per layer from Python; on a fast GPU that host time is several
times the kernels' own (H100, DeepSeek-V3 layer dims: ~3.5 ms of host time per layer against ~0.6 ms of GPU time).
Here each layer's work up to its routed experts (the attention with its cache write, the norms, the router and the
shared expert) is captured once as a CUDA graph and replayed at every step. Where the routed experts' placement
needs the host (a cache holding part of them), they stay eager, after the layer's one host sync. Where it does not
(`Experts.device_only`), they run inside the graph too, and the layer needs no host sync at all: every expert of
the layer sits in a GPU slot for good (its slot looked up on the device), or the CPU computes all of them through a
host node in the graph (the offload engine with no expert cache).

Consecutive layers on one device whose whole work is device work (dense layers and device-only MoE layers) are
captured together as one graph, a span, when nothing observes the hidden state between layers (the prefetcher
does, where a cache holds part of the experts): one launch per span instead of one per layer, whose host cost
(about 50 us each) exceeded a small layer's GPU time. With every expert in VRAM, or none, a stage's whole step is
one graph.

The position lives in a device buffer and attention spans a fixed window of keys (the next power of two above the
position, masked), so one graph serves every step until the sequence outgrows its window; the next window's graphs
are captured then. The window's mask and the rope tables are made once per step and device, inside the graph of
the device's first span, in buffers that every later graph of the step reads. The first graph also looks up the
token's embedding (from a device buffer the step's token id is copied into), and the last one, where it ends the
step on the output head's device, runs the final norm and the head: a step of a model whose experts all sit in
VRAM is one launch from token id to logits. Graphs write into the KV cache they were captured with, so a new cache
drops them.
"""
from __future__ import annotations

import torch

from ..layers.cache import Batch, KVCache
from .common import MoE, on_device

MIN_WINDOW = 64


class DecodeGraphs:
    def __init__(self, model, capture: bool = True):
        """capture=False runs the same fixed-window segments eagerly (how the CPU tests check them)."""
        self.model = model  # the Transformer; not a submodule
        self.capture = capture
        self.enabled = True
        self.cache: KVCache | None = None
        self.graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}  # span, window, slot
        self.inputs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (x, position)
        self.token: torch.Tensor | None = None  # [1, 1] the step's token id, on the embedding's device
        # (device, window) -> the step's attention mask and rope cos, sin: written once per step, read by every
        # layer's graph (computed in each layer, they were a dozen small kernels per layer)
        self.step_tables: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pools: dict[torch.device, object] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.captured = 0
        self.generation = 0  # the experts' slot generation the graphs were captured against
        self.failure: str | None = None  # why graphs were turned off, for the engine to report once
        self._spans: list[range] | None = None
        self.embeds = self.runs_head = False  # whether the first graph embeds the token; the last runs the head

    def applies(self, tokens: torch.Tensor, batch: Batch, cache: KVCache | None) -> bool:
        return (self.enabled and cache is not None and batch.slots is not None and len(batch.slots) == 1
                and batch.n_new == [1] and tuple(tokens.shape) == (1, 1)
                and (not self.capture or all(d.type == "cuda" for d in self.model.devices())))

    def run(self, tokens: torch.Tensor, batch: Batch, cache: KVCache) -> tuple[torch.Tensor, bool] | None:
        """(the hidden state [1, 1, D] after the last layer, False), or (the logits [1, 1, V] in float32, True)
        where the last graph ran the output head; None if graphs cannot be used here (then the caller runs the
        step eagerly, which rewrites the same cache entries)."""
        generation = self.model.experts.generation
        if cache is not self.cache or generation != self.generation:
            self._drop()
            self.cache, self.generation = cache, generation
        model, pos, slot = self.model, batch.start[0], batch.slots[0]
        window = min(cache.max_len, max(MIN_WINDOW, 1 << pos.bit_length()))  # > pos
        spans = self.spans()
        embedding = model.tok_embeddings.weight.device
        if self.embeds:
            if self.token is None:
                self.token = torch.zeros(1, 1, dtype=torch.long, device=embedding)
            self.token.copy_(tokens)
            x = None
        else:
            x = model.tok_embeddings(tokens.to(embedding))
        stage = None
        for span in spans:
            first, last = span[0], span[-1] + 1
            dev = model.devices()[first]
            x_in, position = self._inputs(dev)
            if dev != stage:
                stage = dev
                position.fill_(pos)
            if x is not None:
                x_in.copy_(x)
            with on_device(dev):
                out = self._replay(span, window, slot, dev)
                if out is None:
                    return None
                if len(out) == 1:  # the span's experts ran inside its graph
                    self._ran_device(range(first, last))
                    x = out[0]
                else:  # the span's last layer has its experts placed on the host
                    x_mid, h, ids, weights, shared = out
                    finish = model.experts.start(last - 1, h, ids, weights)
                    x = x_mid + model.layers[last - 1].ffn.combine(finish(), shared).view(x_mid.shape)
                    self._ran_device(range(first, last - 1))
            for observe in model.observers:  # (spans are single layers where there are observers)
                observe(last - 1, x)
        return x, self.runs_head

    def spans(self) -> list[range]:
        """The step's layers in launch order, grouped into spans (see the module's docstring); fixed until the
        graphs are dropped."""
        if self._spans is None:
            model = self.model
            devs = model.devices()
            whole = [not isinstance(b.ffn, MoE) or model.experts.device_only(i) for i, b in enumerate(model.layers)]
            spans: list[list[int]] = []
            for i in range(len(model.layers)):  # a span may end with a layer whose experts go to the host
                if spans and whole[i - 1] and devs[i] == devs[i - 1] and not model.observers:
                    spans[-1].append(i)
                else:
                    spans.append([i])
            self._spans = [range(s[0], s[-1] + 1) for s in spans]
            self.embeds = devs[0] == model.tok_embeddings.weight.device
            self.runs_head = whole[-1] and devs[-1] == model.norm.weight.device and not model.observers
        return self._spans

    def _ran_device(self, layers: range) -> None:
        for i in layers:
            if isinstance(self.model.layers[i].ffn, MoE):
                self.model.experts.ran_device(i)

    def _drop(self) -> None:
        """Forget every graph, and their memory pools with them (a pool does not outlive its graphs)."""
        self.graphs.clear()
        self.pools.clear()
        self._spans = None

    def _inputs(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.inputs.get(dev)
        if got is None:
            w = self.model.tok_embeddings.weight
            got = self.inputs[dev] = (torch.zeros(1, 1, w.shape[1], dtype=w.dtype, device=dev),
                                      torch.zeros(1, 1, dtype=torch.long, device=dev))
        return got

    def _fill_step_tables(self, dev: torch.device, window: int, position: torch.Tensor) -> None:
        mask = Batch.decode_static(position, window, 0).mask
        cos, sin = self.model.tables(dev).cos_sin(position)
        tables = self.step_tables.get((dev, window))
        if tables is None:  # allocated once: captured graphs read these buffers
            self.step_tables[(dev, window)] = (mask, cos, sin)
            return
        for buffer, new in zip(tables, (mask, cos, sin)):
            buffer.copy_(new)

    def _segment(self, span: range, window: int, slot: int, dev: torch.device) -> tuple:
        """The layers of `span` (the last one up to its routed experts, unless they are resident), from the static
        inputs; every tensor it makes stays on the device. The device's first span makes the step's tables."""
        model = self.model
        x, position = self.inputs[dev]
        if span[0] == 0 and self.embeds:
            x = model.tok_embeddings(self.token)
        if span[0] == 0 or model.devices()[span[0] - 1] != dev:
            self._fill_step_tables(dev, window, position)
        mask, cos, sin = self.step_tables[(dev, window)]
        batch = Batch.decode_static(position, window, slot, mask)
        pending = None  # the last layer's feed-forward output, added inside the next norm (as the eager path does)
        for i in span:
            out = self._layer(i, x, pending, batch, cos, sin)
            if len(out) != 2:
                if i != span[-1]:
                    raise RuntimeError(f"layer {i} of a span needs its experts placed on the host")
                return out
            x, pending = out
        if span[-1] == len(model.layers) - 1 and self.runs_head:
            return (model.output(model.norm.add(x, pending)[1]).float(),)
        return (x + pending,)

    def _layer(self, i: int, x_in: torch.Tensor, pending: torch.Tensor | None, batch: Batch, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple:
        """(x after the attention, the feed-forward output still to be added to it), or, where the experts are
        placed on the host, what placing them needs (5 values). pending: the previous layer's such output."""
        block = self.model.layers[i]
        x_mid, h = block.attend(x_in, batch, cos, sin, self.cache.layers[i], pending)
        if not isinstance(block.ffn, MoE):
            return x_mid, block.ffn(h)
        experts = self.model.experts
        if experts.device_only(i):  # no host sync: the MoE block as the eager path runs it
            return x_mid, block.ffn(h, i, experts, device_only=True)
        h = h.reshape(-1, h.shape[-1])  # [1, D]
        ids, weights = block.ffn.route(h)
        shared = block.ffn.shared_out(h)
        return x_mid, h, ids, weights, shared

    def _replay(self, span: range, window: int, slot: int, dev: torch.device) -> tuple | None:
        if not self.capture:
            return self._segment(span, window, slot, dev)
        key = (span[0], span[-1], window, slot)
        got = self.graphs.get(key)
        if got is not None:
            got[0].replay()
            return got[1]
        try:
            got = self.graphs[key] = self._capture(span, window, slot, dev)
        except torch.OutOfMemoryError:  # the caller frees memory (smaller expert cache) and retries the step
            self._drop()
            raise
        except RuntimeError as e:  # something that cannot be captured: decode eagerly from now on
            self.enabled = False
            self.failure = (f"CUDA graphs turned off (layers {span[0]}-{span[-1]}: {str(e).splitlines()[0]}); "
                            "decoding eagerly")
            self._drop()
            return None
        got[0].replay()
        return got[1]

    def _capture(self, span: range, window: int, slot: int, dev: torch.device) -> tuple:
        with torch.cuda.device(dev):
            # One eager run on a side stream first (lazy library initialisation must not happen under capture).
            # It writes the same cache entry the replay then writes again.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._segment(span, window, slot, dev)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # a capture stream of this device (torch's default one belongs to whichever device came first)
            stream = self.streams.get(dev) or self.streams.setdefault(dev, torch.cuda.Stream(dev))
            with torch.cuda.graph(graph, pool=self.pools.get(dev), stream=stream, capture_error_mode="thread_local"):
                out = self._segment(span, window, slot, dev)
            self.pools[dev] = graph.pool()
        self.captured += 1
        return graph, out
