"""GET /metrics: the batch runner's counters in Prometheus' text format (through prometheus_client, one registry
per app so that several servers in one process do not share series)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hybridmoe_"


class BatchCollector:
    """Reads the backend at each scrape; nothing is kept here."""

    def __init__(self, backend):
        self.backend = backend

    def describe(self):
        return []

    def collect(self):
        b = self.backend
        yield GaugeMetricFamily(PREFIX + "model_load_progress", "Fraction of the model loaded (1 when serving)",
                                value=b.progress)
        yield GaugeMetricFamily(PREFIX + "ready", "1 when the model is loaded and requests are served",
                                value=1.0 if b.ready else 0.0)
        if not b.ready:
            return
        m = b.batch.metrics
        decode, prefill = m.rates(time.perf_counter())
        yield GaugeMetricFamily(PREFIX + "decode_tokens_per_second",
                                "Tokens generated per second, all requests together, over the last seconds",
                                value=decode)
        yield GaugeMetricFamily(PREFIX + "prefill_tokens_per_second",
                                "Prompt tokens read per second over the last seconds", value=prefill)
        yield GaugeMetricFamily(PREFIX + "requests_running", "Requests holding a KV cache slot", value=m.running)
        yield GaugeMetricFamily(PREFIX + "requests_waiting", "Requests queued for a slot (queue depth)",
                                value=m.waiting)
        yield GaugeMetricFamily(PREFIX + "batch_rows_mean", "Mean rows per decode step since the start",
                                value=m.decode_rows / max(m.decode_steps, 1))
        finished = CounterMetricFamily(PREFIX + "requests", "Requests finished, by reason", labels=["reason"])
        for reason, n in sorted(dict(m.requests).items()):
            finished.add_metric([reason], n)
        yield finished
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens read", value=m.prompt_tokens)
        yield CounterMetricFamily(PREFIX + "generated_tokens", "Tokens generated", value=m.generated_tokens)
        yield CounterMetricFamily(PREFIX + "decode_steps", "Batched decode steps", value=m.decode_steps)
        yield CounterMetricFamily(PREFIX + "expert_cache_hits", "Routed experts found in a GPU slot",
                                  value=m.cache_hits)
        yield CounterMetricFamily(PREFIX + "expert_cache_misses", "Routed experts not in a GPU slot",
                                  value=m.cache_misses)
        seen = m.cache_hits + m.cache_misses
        yield GaugeMetricFamily(PREFIX + "expert_cache_hit_rate", "Hits over hits and misses since the start",
                                value=m.cache_hits / seen if seen else 0.0)
        yield CounterMetricFamily(PREFIX + "expert_bytes_copied", "Expert bytes copied to the GPUs",
                                  value=m.bytes_copied)
        if m.prefetch_recall is not None:
            yield GaugeMetricFamily(PREFIX + "prefetch_recall", "Share of used experts the prefetcher predicted "
                                    "(last step)", value=m.prefetch_recall)


def registry_for(backend) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BatchCollector(backend))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
