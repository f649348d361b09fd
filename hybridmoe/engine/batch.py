"""The batch runner: many requests served from one engine, decoded together (continuous batching).

One thread runs the steps. Each step holds the engine's turn (as one generate() call does), so a generation started
elsewhere on the same engine waits for the step to end, and the runner waits for that generation; the runner keeps its
own KV cache, so neither disturbs the other's sequences. Each iteration it takes a plan from the scheduler (engine/scheduler.py), runs the decoding rows as one forward call
(each row one token at its own position, in its own KV cache slot) and the plan's prompt chunks as another, samples
every row with its request's own sampler, and hands each request the same Text / Error / Done events that
Engine.generate yields. Requests are submitted and cancelled from other threads at any time; a finished or
cancelled one leaves the batch before the next step. The expert work of a batched step is grouped by expert in the
MoE layers (each expert runs once on all the rows routed to it), so rows share the experts' reads."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import ContextOverflowError, HybridMoEError
from ..layers.cache import Batch, KVCache
from .config import GenerationConfig
from .events import Done, Error, Event, Text
from .generate import expert_stats, nonfinite_cause, with_memory_retry
from .sampler import NonFiniteLogits, make_sampler
from .scheduler import Chunk, Plan, Scheduler, SchedulerConfig, Sequence
from .text import StopFilter, ThinkSplitter
from .tokenizer import StreamDecoder

RATE_WINDOW_S = 10.0  # tokens/s in the metrics are over this many recent seconds


class BatchClosed(HybridMoEError):
    """The runner has been closed (the server is shutting down): nothing new starts."""


class Request:
    """One submitted request. Its events arrive in order through `on_event` (called on the runner's thread), or
    through `events()` when no callback was given; the last one is always Done."""

    def __init__(self, ids: list[int], cfg: GenerationConfig, in_think: bool, tokenizer, eos_ids: set[int],
                 max_context: int, wake: Callable[[], None], on_event: Callable[[Event], None] | None = None):
        self.seq = Sequence(list(ids))
        self.cfg, self.eos_ids = cfg, eos_ids
        self.n_prompt = len(ids)
        self.max_len = min(max_context, self.n_prompt + cfg.max_tokens)
        self.sample = make_sampler(cfg)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops, self.think = StopFilter(cfg.stop), ThinkSplitter(in_think)
        self.opened_think = in_think  # the prompt ends inside <think> (R1's template): the text starts as reasoning
        self.generated: list[int] = []
        self.history = list(ids)  # prompt + generated, for the penalties (as generate_loop keeps it)
        self.text_parts: list[str] = []
        self.done: Done | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None  # when the prompt was read and the first token sampled
        self.t_done: float | None = None
        self._cancel = threading.Event()
        self._wake = wake
        self._queue: queue.Queue | None = None if on_event else queue.Queue()
        self._deliver = on_event or self._queue.put

    @property
    def id(self) -> int:
        return self.seq.id

    def cancel(self) -> None:
        """Thread-safe: the request leaves the batch before the next step and ends with Done("cancelled")."""
        self._cancel.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def events(self) -> Iterator[Event]:
        """The events as they come (blocking), up to and including Done; only without an on_event callback."""
        if self._queue is None:
            raise RuntimeError("this request delivers its events to its on_event callback")
        while True:
            ev = self._queue.get()
            yield ev
            if isinstance(ev, Done):
                return

    # --- on the runner's thread ---
    def take(self, logits: torch.Tensor) -> int | None:
        """Sample the next token from this row's logits [V] and emit its text. Returns the token to feed next, or
        None when the request has finished (its Done is then delivered). The checks are generate_loop's."""
        token = self.sample(logits, self.history)  # host sync: the token decides what comes next
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.eos_ids and not self.cfg.ignore_eos:
            return self.finish("eos")
        self.generated.append(token)
        self.history.append(token)
        piece, hit = self.stops.push(self.decoder.push(token) if self.decoder else "")
        self._emit(piece, (token,))
        if hit:
            return self.finish("stop")
        if len(self.generated) >= self.cfg.max_tokens:
            return self.finish("length")
        if self.n_prompt + len(self.generated) - 1 >= self.max_len:  # the position this token would be fed at
            return self.finish("context")
        return token

    def _emit(self, piece: str, ids: tuple[int, ...] = ()) -> None:
        for chunk, channel in self.think.push(piece):
            self.text_parts.append(chunk)
            self._deliver(Text(chunk, channel, ids))

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.done is not None:
            return None
        if error is not None:
            self._deliver(Error(error))
        held = [] if reason in ("stop", "error") else self.think.push(self.stops.flush())  # a held stop prefix
        for chunk, channel in held + self.think.flush():
            self.text_parts.append(chunk)
            self._deliver(Text(chunk, channel))
        self.t_done = time.perf_counter()
        self.done = Done(reason, self.n_prompt, len(self.generated), "".join(self.text_parts), tuple(self.generated))
        self._deliver(self.done)
        return None


@dataclass
class BatchMetrics:
    """Counters since the runner started, and recent rates, for the server's /metrics. Written by the runner's
    thread; read (a snapshot of plain numbers) by others."""
    requests: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # summed over decode steps: rows / steps is the mean batch
    running: int = 0
    waiting: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    bytes_copied: int = 0
    prefetch_recall: float | None = None
    notices: deque = field(default_factory=lambda: deque(maxlen=64))  # the latest ones
    recent: deque = field(default_factory=deque)  # (time, decode tokens, prefill tokens, busy seconds)

    def step(self, t: float, decoded: int, prefilled: int, busy_s: float, extra: dict) -> None:
        self.recent.append((t, decoded, prefilled, busy_s))
        while self.recent and self.recent[0][0] < t - RATE_WINDOW_S:
            self.recent.popleft()
        self.prompt_tokens += prefilled
        self.cache_hits += int(_total(extra.get("cache_hits", 0)))
        self.cache_misses += int(_total(extra.get("cache_misses", 0)))
        self.bytes_copied += int(_total(extra.get("bytes_copied", 0)))
        if "prefetch_recall" in extra:
            self.prefetch_recall = float(extra["prefetch_recall"])

    def rates(self, now: float) -> tuple[float, float]:
        """(decode, prefill) tokens per second over the recent window."""
        recent = [r for r in list(self.recent) if r[0] >= now - RATE_WINDOW_S]  # (a copy: the runner appends)
        if not recent:
            return 0.0, 0.0
        span = max(now - recent[0][0] + recent[0][3], 1e-9)  # from the start of the first step in the window
        return sum(r[1] for r in recent) / span, sum(r[2] for r in recent) / span


def _total(value) -> float:
    return float(sum(value.values())) if isinstance(value, dict) else float(value)


class BatchEngine:
    """Serves many requests at once from one loaded engine (hybridmoe.Engine), `config.max_seqs` decoding together.
    Start it, submit requests from any thread, close it when done."""

    def __init__(self, engine, config: SchedulerConfig | None = None,
                 on_notice: Callable[[str], None] | None = None):
        self.engine, self.model = engine, engine.model
        config = config or SchedulerConfig()
        # a prefill call reads at most the engine's chunk (on a GPU, sized from free VRAM)
        self.config = dataclasses.replace(config, prefill_tokens=min(config.prefill_tokens, engine.prefill_chunk))
        self.scheduler = Scheduler(self.config)
        self.device = self.model.tok_embeddings.weight.device
        self.on_notice = on_notice or (lambda msg: None)
        notices: list[str] = []
        # one slot per sequence, each as long as the context; its own, not the model's reusable one (which a
        # generate() call elsewhere would write into)
        self.cache = with_memory_retry(lambda: KVCache(self.model.cache_shapes(), self.config.max_seqs,
                                                       engine.max_context, self.model.norm.weight.dtype,
                                                       self.model.devices()), self.model, notices)
        self.metrics = BatchMetrics()
        self._cond = threading.Condition()
        self._live: dict[int, Request] = {}  # sequence id -> request, from submit until it finishes
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hybridmoe-batch", daemon=True)
        for msg in notices:
            self._notice(msg)

    def start(self) -> "BatchEngine":
        self._thread.start()
        return self

    def close(self, wait: bool = True) -> None:
        """Cancel every request (each gets its Done) and stop the runner's thread after its current step; `wait`
        for that to happen."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "BatchEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt_or_messages: str | list[dict] | list[int], config: GenerationConfig | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a completion of a plain prompt, token ids or a conversation (as Engine.generate reads them).
        Tokenizes in the calling thread. Raises ContextOverflowError or ValueError for a prompt that cannot run,
        QueueFull when every slot is busy and the queue is at its limit."""
        cfg = config or GenerationConfig()
        ids, in_think = self.engine.prompt_ids(prompt_or_messages)
        if not ids:
            raise ValueError("the prompt is empty")
        limit = self.engine.max_context
        if len(ids) >= limit:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context holds {limit} (the "
                                       f"prompt and at least one generated token); shorten the prompt")
        req = Request(ids, cfg, in_think, self.engine.tokenizer, self.engine.eos_ids, limit, self._wake, on_event)
        with self._cond:
            if self._closed:
                raise BatchClosed("the server is shutting down")
            self.scheduler.add(req.seq)  # raises QueueFull
            self._live[req.id] = req
            self.metrics.waiting = len(self.scheduler.waiting)
            self._cond.notify_all()
        return req

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _notice(self, msg: str) -> None:
        self.metrics.notices.append(msg)
        self.on_notice(msg)

    # --- the runner's thread ---
    def _run(self) -> None:
        while True:
            with self._cond:
                self._reap()
                while self.scheduler.idle and not self._closed:
                    self._cond.wait()
                    self._reap()
                if self._closed:
                    for req in list(self._live.values()):
                        self._end(req, "cancelled")
                    return
                plan = self.scheduler.plan()
                self.metrics.running = len(self.scheduler.running)
                self.metrics.waiting = len(self.scheduler.waiting)
            if plan.empty:
                continue
            try:
                # the step's stats admit hot experts to the cache (in-place on inference tensors): in the mode too
                with self.engine._turn(), torch.inference_mode():
                    self._step(plan)
            except Exception as e:  # a failure outside the forward call (sampling, text) ends its step's rows only
                with self._cond:
                    for seq in plan.decode + [c.seq for c in plan.prefill]:
                        if seq.id in self._live:
                            self._end(self._live[seq.id], "error", f"{type(e).__name__}: {e}")

    def _reap(self) -> None:
        """Cancelled requests leave the batch (with the lock held)."""
        for req in [r for r in self._live.values() if r.cancelled]:
            self._end(req, "cancelled")

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish(reason, error)
        self.scheduler.finish(req.seq)
        self._live.pop(req.id, None)
        self.metrics.requests[req.done.reason] = self.metrics.requests.get(req.done.reason, 0) + 1

    def _step(self, plan: Plan) -> None:
        t0 = time.perf_counter()
        decoded = prefilled = 0
        if plan.decode:
            decoded = self._decode(plan.decode)
        if plan.prefill:
            prefilled = self._prefill(plan.prefill)
        t1 = time.perf_counter()
        extra = expert_stats(self.model)  # once per step: the offload engine's counters (and its cache's decay)
        for msg in extra.pop("notices", []):
            self._notice(msg)
        graphs = self.model.decode_graphs
        if graphs is not None and graphs.failure:
            self._notice(graphs.failure)
            graphs.failure = None
        self.metrics.step(t1, decoded, prefilled, t1 - t0, extra)

    def _forward(self, rows: list[Request], tokens: list[list[int]], batch: Batch) -> torch.Tensor | None:
        """Logits [B, V] at each row's last new token, or None after failing every row of the call."""
        notices: list[str] = []
        try:
            with torch.inference_mode():
                x = torch.tensor(tokens, device=self.device)
                return with_memory_retry(lambda: self.model(x, batch, self.cache, last_only=True), self.model,
                                         notices)
        except torch.OutOfMemoryError:
            error = "out of memory during generation even with the expert cache emptied; lower --ctx or --max-seqs"
        except HybridMoEError as e:
            error = str(e)
        except Exception as e:  # a failing step ends its rows' requests, not the server
            error = f"{type(e).__name__}: {e}"
        finally:
            for msg in notices:
                self._notice(msg)
        with self._cond:
            for req in rows:
                self._end(req, "error", error)
        return None

    def _decode(self, seqs: list[Sequence]) -> int:
        rows = [self._live[s.id] for s in seqs]
        batch = Batch.make([s.cached for s in seqs], [1] * len(seqs), [s.slot for s in seqs], self.device)
        logits = self._forward(rows, [[s.pending] for s in seqs], batch)
        if logits is None:
            return 0
        self._settle(rows, [1] * len(rows), logits)
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(rows)
        return len(rows)

    def _prefill(self, chunks: list[Chunk]) -> int:
        rows = [self._live[c.seq.id] for c in chunks]
        width = max(len(c.tokens) for c in chunks)
        tokens = [c.tokens + [0] * (width - len(c.tokens)) for c in chunks]  # right-padded; padding is masked
        batch = Batch.make([c.start for c in chunks], [len(c.tokens) for c in chunks], [c.seq.slot for c in chunks],
                           self.device)
        logits = self._forward(rows, tokens, batch)
        if logits is None:
            return 0
        self._settle(rows, [len(c.tokens) for c in chunks], logits, [c.last for c in chunks])
        return sum(len(c.tokens) for c in chunks)

    def _settle(self, rows: list[Request], written: list[int], logits: torch.Tensor,
                sampled: list[bool] | None = None) -> None:
        """After a forward call: sample the rows whose logits give a token, then update the scheduler."""
        before = sum(len(row.generated) for row in rows)
        tokens = [self._take(row, logits[i]) if sampled is None or sampled[i] else None
                  for i, row in enumerate(rows)]
        with self._cond:
            self.metrics.generated_tokens += sum(len(row.generated) for row in rows) - before
            for row, n, token in zip(rows, written, tokens):
                if row.done is not None:  # finished by this token: its slot is free for the next step
                    self._end(row, row.done.reason)
                else:
                    self.scheduler.advance(row.seq, n, token)

    def _take(self, row: Request, logits: torch.Tensor) -> int | None:
        try:
            return row.take(logits)
        except NonFiniteLogits:
            at = f"token {len(row.generated) + 1}" if row.generated else "the end of the prompt"
            return row.finish("error", f"the model's logits are NaN or infinite at {at}; "
                                       f"{nonfinite_cause(self.model)}")
        except Exception as e:  # this row's sampler or text failed: it ends, the others go on
            return row.finish("error", f"{type(e).__name__}: {e}")

    @property
    def running(self) -> int:
        with self._cond:
            return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self.scheduler.waiting)
