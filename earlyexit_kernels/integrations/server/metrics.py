"""What the server exposes at ``GET /metrics`` (Prometheus text format).

- ``eek_requests_total{status}``: answered requests by HTTP status;
- ``eek_sequences_total``: sequences classified;
- ``eek_request_duration_seconds``: latency of ``/predict`` answers (histogram);
- ``eek_exit_layer``: exit layers of the sequences (histogram: its ``_sum / _count`` is the
  mean exit layer); ``eek_layers_run_total``: layers computed, summed over sequences;
- ``eek_queue_depth``: sequences submitted and not finished;
- ``eek_layer_calls_total``, ``eek_layer_call_rows_total``, ``eek_rows_per_layer_call``:
  the engine's layer calls, the real rows they held, and their mean.

Each app has its own registry, so several apps in one process never collide.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Counters for one app; ``engine_stats`` and ``queue_depth`` are read when scraped."""

    def __init__(self, num_layers: int, engine_stats: Callable, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("eek_requests", "Answered /predict requests", ["status"], registry=self.registry)
        self.sequences = Counter("eek_sequences", "Sequences classified", registry=self.registry)
        self.latency = Histogram(
            "eek_request_duration_seconds",
            "Latency of /predict answers",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.exit_layer = Histogram(
            "eek_exit_layer",
            "Layer after which each sequence left (mean: _sum / _count)",
            buckets=tuple(range(1, num_layers + 1)),
            registry=self.registry,
        )
        self.layers_run = Counter("eek_layers_run", "Layers computed, summed over sequences", registry=self.registry)
        Gauge("eek_queue_depth", "Sequences submitted and not finished", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("eek_layer_calls_total", "Layer calls the engine ran", registry=self.registry).set_function(
            lambda: engine_stats().calls
        )
        Gauge("eek_layer_call_rows_total", "Real rows held by the layer calls", registry=self.registry).set_function(
            lambda: engine_stats().rows
        )
        Gauge("eek_rows_per_layer_call", "Mean real rows per layer call", registry=self.registry).set_function(
            lambda: engine_stats().rows / max(engine_stats().calls, 1)
        )

    def record_sequence(self, exit_layer: int, layers_run: int) -> None:
        self.sequences.inc()
        self.exit_layer.observe(exit_layer)
        self.layers_run.inc(layers_run)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
