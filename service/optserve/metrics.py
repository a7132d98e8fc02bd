"""The Prometheus metrics of one app, in a registry of its own.

A module with no FastAPI in it, so the engine and the store record into the same object the API
serves at /metrics (dependencies still point api -> engine -> store). One registry per app, not
prometheus_client's global one: several apps (or tests) in one process never share or
double-register a metric.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

# No `*_created` series beside every counter and histogram: they double the exposition and
# Prometheus ignores them (it tracks resets itself). A process-wide switch of the library.
disable_created_metrics()

#: Seconds, from a 1e3-element push on loopback (about a millisecond) to a sync round's barrier.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Store calls are one round trip each: finer at the low end.
STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
#: Updates in one group commit: at most the batcher's max_batch (256).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every optserve metric; the names and labels are listed in the README (Observability)."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process:  # process_* (CPU, memory, fds) and python_* (version, GC)
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        registry = self.registry
        self.push_seconds = Histogram(
            "optserve_push_duration_seconds",
            "Acknowledged (200) gradient pushes, from the request to the response body: "
            "by session mode (async|sync) and request codec (json|safetensors)",
            ["mode", "codec"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.updates_applied = Counter(
            "optserve_updates_applied_total",
            "Optimizer steps committed (an async push is one; a sync round is one)",
            ["mode"],
            registry=registry,
        )
        self.pushes_rejected = Counter(
            "optserve_pushes_rejected_total",
            "Gradient pushes answered with a problem, by its code",
            ["code"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "optserve_store_duration_seconds",
            "Calls into the Redis store, by operation",
            ["operation"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.group_commit_updates = Histogram(
            "optserve_group_commit_updates",
            "Optimizer steps per group commit (one load, one compare-and-set commit); the sum "
            "equals the updates applied",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.round_seconds = Histogram(
            "optserve_sync_round_duration_seconds",
            "Applied sync rounds, from the first push that opened the round to its settlement "
            "(measured on the store's clock)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_sessions = Gauge(
            "optserve_open_sessions",
            "Sessions in the store (read from the store at scrape time)",
            registry=registry,
        )

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry as text: OpenMetrics if the scraper's Accept asks for it, else the
        classic Prometheus format; returns (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
