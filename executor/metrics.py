"""Prometheus instruments for streams. Jina's own request metrics time only the creation of a streaming
generator, so the executor measures streams itself, from the engine's outputs."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine import StepOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, registry=registry, buckets=LATENCY_BUCKETS)

        self.time_to_first_token = histogram("llm_time_to_first_token_seconds", "Arrival to first token")
        self.inter_token_latency = histogram("llm_inter_token_latency_seconds", "Time between two tokens of a stream")
        self.queue_time = histogram("llm_queue_time_seconds", "Arrival to the start of prefill")
        self.end_to_end = histogram("llm_request_duration_seconds", "Arrival to the last document")
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generated_tokens = Counter("llm_generated_tokens", "Generated tokens", registry=registry)
        self.requests = Counter(
            "llm_requests", "Finished requests by finish reason", ["finish_reason"], registry=registry
        )
        Gauge("llm_running_streams", "Streams being prefilled or decoded", registry=registry).set_function(running)
        Gauge("llm_waiting_streams", "Streams queued for a batch slot", registry=registry).set_function(waiting)

    def observe_token(self, output: StepOutput, since_last_output: float | None) -> None:
        """Called by the stream's consumer as it relays each output: the gaps its client sees."""
        if output.token_id >= 0 and since_last_output is not None and output.index > 0:
            self.inter_token_latency.observe(since_last_output)

    def observe_finished(self, output: StepOutput) -> None:
        """The engine's `on_finished`: every request's last output, also of a stream nobody reads any more."""
        assert output.finish_reason is not None  # the engine reports finished requests only
        self.requests.labels(output.finish_reason.value).inc()
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generated_tokens.inc(output.completion_tokens)
        for histogram, value in (
            (self.time_to_first_token, output.time_to_first_token_s),
            (self.queue_time, output.queue_time_s),
            (self.end_to_end, output.total_time_s),
        ):
            if value is not None:
                histogram.observe(value)
