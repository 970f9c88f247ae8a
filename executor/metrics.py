"""Prometheus instruments for streams. Jina's own request metrics time only the creation of a streaming
generator, so the executor measures streams itself, from the engine's outputs. Every series carries the `model`
label (the served model id), so that replicas of different models can share one Prometheus."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import StepOutput
from engine.prefix_cache import PrefixCacheStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Prompt and generation lengths in tokens: powers of two up to past any context this service serves.
LENGTH_BUCKETS = tuple(float(2**power) for power in range(16))


class EngineCounts(Protocol):
    """What the engine publishes after each step (LLMEngine's properties)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def decode_batch_size(self) -> int: ...

    @property
    def kv_cache_tokens(self) -> int: ...

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats: ...

    @property
    def prefix_cache_block_bytes(self) -> int: ...


class PrefixCacheCollector(Collector):
    """The prefix cache's counts, read from the engine's last published snapshot at each scrape: the engine
    thread counts, so nothing here is incremented."""

    def __init__(self, model: str, engine: EngineCounts) -> None:
        self.model, self.engine = model, engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.prefix_cache_stats
        for name, doc, value in (
            ("llm_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", stats.hit_tokens),
            ("llm_prefix_cache_miss_tokens", "Prompt tokens prefilled (not in the prefix cache)", stats.miss_tokens),
            ("llm_prefix_cache_evictions", "Prefix cache blocks evicted to make room", stats.evictions),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model"])
            counter.add_metric([self.model], value)
            yield counter
        bytes_held = stats.blocks * self.engine.prefix_cache_block_bytes
        for name, doc, value in (
            ("llm_prefix_cache_blocks", "Blocks holding a cached prefix", stats.blocks),
            ("llm_prefix_cache_bytes", "Bytes of KV the prefix cache's blocks hold", bytes_held),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model"])
            gauge.add_metric([self.model], value)
            yield gauge


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry, model: str, engine: EngineCounts) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, ["model"], registry=registry, buckets=buckets).labels(model)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["model"], registry=registry).labels(model)

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, ["model"], registry=registry).labels(model).set_function(read)

        self.time_to_first_token = histogram("llm_time_to_first_token_seconds", "Arrival to first token")
        self.inter_token_latency = histogram("llm_inter_token_latency_seconds", "Time between two tokens of a stream")
        self.queue_time = histogram("llm_queue_time_seconds", "Arrival to the start of prefill")
        self.end_to_end = histogram("llm_request_duration_seconds", "Arrival to the last document")
        self.prompt_length = histogram("llm_prompt_length_tokens", "Prompt tokens per request", LENGTH_BUCKETS)
        self.generation_length = histogram("llm_generation_length_tokens", "Generated tokens", LENGTH_BUCKETS)
        self.prompt_tokens = counter("llm_prompt_tokens", "Prompt tokens of finished requests")
        self.generated_tokens = counter("llm_generated_tokens", "Generated tokens")
        self._requests = Counter(
            "llm_requests", "Finished requests by finish reason", ["model", "finish_reason"], registry=registry
        )
        self.model = model
        gauge("llm_running_streams", "Streams being prefilled or decoded", lambda: engine.num_running)
        gauge("llm_waiting_streams", "Streams queued for a batch slot", lambda: engine.num_waiting)
        gauge("llm_batch_size", "Rows of the last decode step (0 when none runs)", lambda: engine.decode_batch_size)
        gauge("llm_kv_cache_tokens", "KV-cache positions the batch's rows hold", lambda: engine.kv_cache_tokens)
        registry.register(PrefixCacheCollector(model, engine))

    def count_request(self, finish_reason: str) -> None:
        self._requests.labels(self.model, finish_reason).inc()

    def observe_token(self, output: StepOutput, since_last_output: float | None) -> None:
        """Called by the stream's consumer as it relays each output: the gaps its client sees."""
        if output.token_id >= 0 and since_last_output is not None and output.index > 0:
            self.inter_token_latency.observe(since_last_output)

    def observe_finished(self, output: StepOutput) -> None:
        """The engine's `on_finished`: every request's last output, also of a stream nobody reads any more."""
        assert output.finish_reason is not None  # the engine reports finished requests only
        self.count_request(output.finish_reason.value)
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generated_tokens.inc(output.completion_tokens)
        self.prompt_length.observe(output.prompt_tokens)
        self.generation_length.observe(output.completion_tokens)
        for histogram, value in (
            (self.time_to_first_token, output.time_to_first_token_s),
            (self.queue_time, output.queue_time_s),
            (self.end_to_end, output.total_time_s),
        ):
            if value is not None:
                histogram.observe(value)
