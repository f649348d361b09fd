"""A running `hybridmoe serve` in place of a loaded engine, for `chat --connect` and `repl --connect`: chat() streams
the server's chat completions as the engine's events (Text by channel, Stats with what /metrics reports, Done), and
stop() ends the answer by closing the stream, which cancels the request on the server."""
from __future__ import annotations

import json
import threading
import time
from pathlib import PurePosixPath
from types import SimpleNamespace
from typing import Iterator

import httpx
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from ..engine.config import GenerationConfig
from ..engine.events import Done, Error, Event, Stats, Text
from ..errors import HybridMoEError

STATS_EVERY_S = 0.5  # how often a streamed answer reads /metrics for the monitor
COUNTERS = {"hybridmoe_expert_cache_hits": "cache_hits", "hybridmoe_expert_cache_misses": "cache_misses",
            "hybridmoe_expert_bytes_copied": "bytes_copied"}
FINISHED = {"stop": "eos", "length": "length"}


class _RemoteModel:
    def __init__(self, moe_layers: list[int]):
        self._moe = moe_layers

    def moe_layers(self) -> list[int]:
        return list(self._moe)


class RemoteEngine:
    """The parts of hybridmoe.Engine that the REPL and the chat UI use, over HTTP."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0):
        root = url.rstrip("/").removesuffix("/v1")
        if not root.startswith(("http://", "https://")):
            root = "http://" + root
        self.url = root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no read timeout: a long prompt may take a while before the first token
        self.http = httpx.Client(base_url=root, headers=headers, timeout=httpx.Timeout(timeout, read=None))
        data = self._get("/v1/models").json()["data"][0]
        meta = data.get("meta") or {}
        self.model_id = data["id"]
        self.path = PurePosixPath(self.model_id)
        self.device = f"{root} ({meta.get('device', '?')})"
        self.max_context = meta.get("context", "?")
        self.model_type = meta.get("model_type", "?")
        self.model = _RemoteModel(meta.get("moe_layers", []))
        self.args = SimpleNamespace(n_layers=meta.get("n_layers", "?"),
                                    n_routed_experts=meta.get("n_routed_experts", 0),
                                    router=SimpleNamespace(top_k=meta.get("top_k", "?")))
        self._response: httpx.Response | None = None
        self._stopped = threading.Event()
        self._counters: dict[str, float] = {}

    def _get(self, path: str) -> httpx.Response:
        try:
            r = self.http.get(path)
        except httpx.HTTPError as e:
            raise HybridMoEError(f"cannot reach the server at {self.url}: {e}") from None
        if r.status_code != 200:
            raise HybridMoEError(f"{self.url}{path}: {_message(r)}")
        return r

    def placement(self) -> list[tuple[str, str]]:
        return [("server", self.url), ("model", self.model_id), ("device", self.device)]

    def stop(self) -> None:
        """End the answer being streamed (thread-safe)."""
        self._stopped.set()
        response = self._response
        if response is not None:
            response.close()

    def chat(self, messages: list[dict], config: GenerationConfig | None = None) -> Iterator[Event]:
        cfg = config or GenerationConfig()
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "top_k": cfg.top_k, "min_p": cfg.min_p, "seed": cfg.seed, "stop": list(cfg.stop),
                "repetition_penalty": cfg.repetition_penalty, "frequency_penalty": cfg.frequency_penalty,
                "presence_penalty": cfg.presence_penalty, "ignore_eos": cfg.ignore_eos}
        return self._stream(body)

    def _stream(self, body: dict) -> Iterator[Event]:
        self._stopped.clear()
        self._metrics_delta()  # the counters' starting point
        t0 = time.perf_counter()
        t_first = last_stats = None
        chunks, parts, reason, used = 0, [], None, None
        try:
            with connect_sse(self.http, "POST", "/v1/chat/completions", json=body) as source:
                self._response = source.response
                if source.response.status_code != 200:
                    source.response.read()
                    yield Error(_message(source.response))
                    yield Done("error", 0, 0, "")
                    return
                for sse in source.iter_sse():
                    if sse.data == "[DONE]":
                        break
                    data = json.loads(sse.data)
                    if "error" in data:
                        yield Error(data["error"].get("message", "the server failed"))
                        reason = "error"
                        continue
                    if data.get("usage"):
                        used = data["usage"]
                    for choice in data.get("choices", []):
                        delta = choice.get("delta") or {}
                        for key, channel in (("reasoning_content", "reasoning"), ("content", "answer")):
                            if delta.get(key):
                                t_first = t_first or time.perf_counter()
                                chunks += 1
                                parts.append(delta[key])
                                yield Text(delta[key], channel)
                        reason = FINISHED.get(choice.get("finish_reason"), reason)
                    now = time.perf_counter()
                    if t_first is not None and (last_stats is None or now - last_stats >= STATS_EVERY_S):
                        last_stats = now
                        yield self._stats(chunks, 0, t0, t_first, now)
        except (httpx.HTTPError, RuntimeError) as e:  # closed by stop(), or the connection failed
            if not self._stopped.is_set():
                yield Error(f"the connection to {self.url} failed: {e}")
                reason = "error"
        finally:
            self._response = None
        if self._stopped.is_set():
            reason = "cancelled"
        prompt = used["prompt_tokens"] if used else 0
        done_tokens = used["completion_tokens"] if used else chunks
        if t_first is not None:
            yield self._stats(done_tokens, prompt, t0, t_first, time.perf_counter())
        yield Done(reason or "eos", prompt, done_tokens, "".join(parts))

    def _stats(self, tokens: int, prompt: int, t0: float, t_first: float, now: float) -> Stats:
        decode = (tokens - 1) / (now - t_first) if tokens > 1 and now > t_first else 0.0
        prefill = prompt / (t_first - t0) if prompt and t_first > t0 else 0.0
        return Stats("decode", tokens, prompt, prefill, decode, now - t0, self._metrics_delta())

    def _metrics_delta(self) -> dict:
        """What /metrics says since the last call: counter increments, and the prefetcher's recall."""
        try:
            text = self.http.get("/metrics").text
        except httpx.HTTPError:
            return {}
        out: dict = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removesuffix("_total")
                if name in COUNTERS:
                    key = COUNTERS[name]
                    out[key] = sample.value - self._counters.get(key, sample.value)
                    self._counters[key] = sample.value
                elif name == "hybridmoe_prefetch_recall":
                    out["prefetch_recall"] = sample.value
        return out


def _message(r: httpx.Response) -> str:
    try:
        return f"{r.status_code}: {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code}: {r.text[:200]}"
