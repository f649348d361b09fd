"""The generate loop: chunked prefill, then one token per step, as a generator of events."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import torch

from ..errors import HybridMoEError
from ..layers.cache import Batch
from ..models.common import Transformer
from .config import GenerationConfig
from .events import Done, Error, Event, Notice, Progress, Stats, Text
from .sampler import NonFiniteLogits, make_sampler
from .text import StopFilter, ThinkSplitter
from .tokenizer import StreamDecoder, Tokenizer


PROGRESS_AFTER_S = 1.0  # a prompt read for longer than this reports its progress after each chunk


def expert_stats(model: Transformer) -> dict:
    return model.experts.take_stats()


def with_memory_retry(fn, model: Transformer, notices: list[str]):
    """Run fn(); on GPU out-of-memory, let the offload engine give memory back (shrinking its expert cache) and
    retry, so an answer never dies mid-way for want of cache space."""
    release = model.experts.release_memory
    while True:
        try:
            return fn()
        except torch.OutOfMemoryError:
            msg = release()
            if msg is None:
                raise
            notices.append(msg)


def nonfinite_cause(model: Transformer) -> str:
    """The likely cause of NaN or infinite logits, for the error message (the config values that produce them
    are refused on load, so what is left is the weights)."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
                return f"the weight {name} holds NaN or infinite values: the model file is damaged"
    return ("no dense weight holds NaN or infinity, so the routed experts' weights are the likely cause (a damaged "
            "file), or values too large for --dtype (try float32)")


def generate_loop(model: Transformer, tok: Tokenizer | None, eos_ids: set[int], prompt_ids: list[int], cfg: GenerationConfig, *,
                  max_context: int, in_think: bool = False, cancel: threading.Event | None = None,
                  prefill_chunk: int = 512) -> Iterator[Event]:
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        yield Error("the prompt is empty")
        yield Done("error", 0, 0, "")
        return
    if n_prompt >= max_context:
        yield Error(f"the prompt has {n_prompt} tokens but the context holds {max_context}; "
                    "shorten the prompt or raise --ctx")
        yield Done("context", n_prompt, 0, "")
        return
    device = model.tok_embeddings.weight.device
    sample = make_sampler(cfg)
    max_len = min(max_context, n_prompt + cfg.max_tokens)
    decoder = StreamDecoder(tok) if tok is not None else None  # without a tokenizer: token ids only
    stops, think = StopFilter(cfg.stop), ThinkSplitter(in_think)
    generated: list[int] = []
    history = list(prompt_ids)  # prompt + generated, for the repetition penalty; grown in place, not rebuilt
    text_parts: list[str] = []

    def emit(piece: str, ids: tuple[int, ...]) -> Iterator[Event]:
        for chunk, channel in think.push(piece):
            text_parts.append(chunk)
            yield Text(chunk, channel, ids)

    def finish(reason: str) -> Iterator[Event]:
        held = [] if reason == "stop" else think.push(stops.flush())  # text held back as a possible stop prefix
        for chunk, channel in held + think.flush():
            text_parts.append(chunk)
            yield Text(chunk, channel)
        yield Done(reason, n_prompt, len(generated), "".join(text_parts), tuple(generated))

    notices: list[str] = []

    def step(tokens: list[list[int]], batch: Batch) -> torch.Tensor:
        return with_memory_retry(lambda: model(torch.tensor(tokens, device=device), batch, cache, last_only=True)[0],
                                 model, notices)

    def stats_events(phase: str, n: int, decode_rate: float) -> Iterator[Event]:
        extra = expert_stats(model)
        graphs = model.decode_graphs
        if graphs is not None and graphs.failure:
            notices.append(graphs.failure)
            graphs.failure = None
        for msg in notices + extra.pop("notices", []):
            yield Notice(msg)
        notices.clear()
        yield Stats(phase, n, n_prompt, prefill_rate, decode_rate, time.perf_counter() - t0, extra)

    try:
        t0 = time.perf_counter()
        prefill_rate = 0.0
        # rounded up, so that the next calls can reuse this cache (and the decode graphs that write into it)
        size = min(max_context, max(256, 1 << (max_len - 1).bit_length()))
        cache = with_memory_retry(lambda: model.new_cache(1, size), model, notices)
        with torch.inference_mode():
            for s in range(0, n_prompt, prefill_chunk):
                chunk = prompt_ids[s:s + prefill_chunk]
                logits = step([chunk], Batch.make([s], [len(chunk)], [0], device))
                done = s + len(chunk)
                if done < n_prompt:  # between chunks: report, and stop here if asked to
                    elapsed = time.perf_counter() - t0
                    if elapsed >= PROGRESS_AFTER_S:
                        yield Progress(done, n_prompt, elapsed)
                    if cancel is not None and cancel.is_set():
                        yield from finish("cancelled")
                        return
            prefill_rate = n_prompt / max(time.perf_counter() - t0, 1e-9)
            yield from stats_events("prefill", 0, 0.0)
            t_decode = time.perf_counter()
            pos = n_prompt
            while True:
                try:
                    token = sample(logits, history)  # host sync: the token decides what comes next
                except NonFiniteLogits:
                    at = f"token {len(generated) + 1}" if generated else "the end of the prompt"
                    yield Error(f"the model's logits are NaN or infinite at {at}; {nonfinite_cause(model)}")
                    yield from finish("error")
                    return
                if token in eos_ids and not cfg.ignore_eos:
                    yield from finish("eos")
                    return
                generated.append(token)
                history.append(token)
                piece, hit = stops.push(decoder.push(token) if decoder else "")
                yield from emit(piece, (token,))
                if hit:
                    yield from finish("stop")
                    return
                elapsed = time.perf_counter() - t_decode
                yield from stats_events("decode", len(generated), len(generated) / max(elapsed, 1e-9))
                if len(generated) >= cfg.max_tokens:
                    yield from finish("length")
                    return
                if pos >= max_len:
                    yield from finish("context")
                    return
                if cancel is not None and cancel.is_set():
                    yield from finish("cancelled")
                    return
                logits = step([[token]], Batch.make([pos], [1], [0], device))
                pos += 1
    except torch.OutOfMemoryError:
        yield Error("out of memory during generation even with the expert cache emptied; lower --ctx")
        yield Done("error", n_prompt, len(generated), "".join(text_parts), tuple(generated))
    except HybridMoEError as e:
        yield Error(str(e))
        yield Done("error", n_prompt, len(generated), "".join(text_parts), tuple(generated))
