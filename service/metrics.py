"""Prometheus metrics. One registry per app, so several apps (tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "neuroserve_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "neuroserve_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "neuroserve_model_requests",
            "Inference requests by model and outcome (ok or the error_type).",
            ["model", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "neuroserve_model_request_duration_seconds",
            "Time from queueing to answer, per model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "neuroserve_queue_duration_seconds",
            "Time a request waited in the model's batch queue.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "neuroserve_compute_duration_seconds",
            "Time to run one batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "neuroserve_batch_size",
            "Rows per executed batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("neuroserve_queue_depth", "Requests waiting per model.", ["model"], registry=r)
        self.model_ready = Gauge(
            "neuroserve_model_ready", "1 when the model version serves, 0 otherwise.", ["model", "version"], registry=r
        )

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)


class ModelObserver:
    """The batcher's hooks, bound to one model's label values once (labels() is not free)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._depth = metrics.queue_depth.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._compute = metrics.compute_time.labels(model)
        self._queue = metrics.queue_time.labels(model)
        self._latency = metrics.request_latency.labels(model)
        self._requests = metrics.requests
        self._by_outcome: dict[str, Counter] = {}
        self._model = model

    def on_queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def on_batch(self, size: int, compute_s: float) -> None:
        self._batch.observe(size)
        self._compute.observe(compute_s)

    def on_dequeue(self, queue_s: float) -> None:
        self._queue.observe(queue_s)

    def on_step(self, rows: int, sequences: int, seconds: float) -> None:
        """A step-level decoder step: its rows are the model's batch, like a batcher's batch."""
        self.on_batch(rows, seconds)

    def on_request(self, outcome: str, latency_s: float) -> None:
        counter = self._by_outcome.get(outcome)
        if counter is None:
            counter = self._by_outcome[outcome] = self._requests.labels(self._model, outcome)
        counter.inc()
        self._latency.observe(latency_s)
