"""Prometheus metrics for one app instance: its own registry, so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Request counts and latencies per route, batch sizes, queue wait, cache hits and index size."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.active = 0  # requests being handled now, read by the micro-batchers
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipforge_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "clipforge_request_duration_seconds", "HTTP request latency by route template",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge("clipforge_requests_in_flight", "requests being served", registry=self.registry)
        self.batch_size = Histogram(
            "clipforge_batch_size", "items per forward pass, by encoder", ["kind"],
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.queue_wait = Histogram(
            "clipforge_queue_wait_seconds", "time an item waited for its batch to start, by encoder", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.cache = Counter(
            "clipforge_text_cache", "text embedding cache lookups", ["result"], registry=self.registry,
        )
        self.index_size = Gauge("clipforge_index_size", "images in the index", registry=self.registry)
        self.model_loaded = Gauge("clipforge_model_loaded", "1 once the checkpoint is loaded", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
