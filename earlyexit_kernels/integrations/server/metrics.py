"""What the server exposes at ``GET /metrics`` (Prometheus text format).

- ``eek_requests_total{status}``: answered requests by HTTP status;
- ``eek_sequences_total``: sequences classified;
- per answered request of the POST routes (histograms; the spans of the request's timing headers,
  defined in :class:`earlyexit_kernels.integrations.server.request_costs.RequestCosts`):
  ``eek_request_duration_seconds``, from its arrival to its answer (``x-total-time``);
  ``eek_request_tokenization_seconds``, until its texts are tokenized (body read and parsed
  included); ``eek_request_queue_seconds``, from then until the engine admits its first
  sequence; ``eek_request_inference_seconds``, from then until its last sequence's answer, split
  into ``eek_request_layers_seconds`` (in the layer calls that held its sequence longest in calls)
  and ``eek_request_waiting_seconds`` (the rest: waiting for a call); ``eek_request_answer_seconds``,
  from its last sequence's answer to its own;
- ``eek_exit_layer``: exit layers of the sequences (histogram: its ``_sum / _count`` is the
  mean exit layer); ``eek_layers_run_total``: layers computed, summed over sequences;
- ``eek_queue_depth``: sequences submitted and not finished;
- ``eek_layer_calls_total``, ``eek_layer_call_rows_total``, ``eek_rows_per_layer_call``:
  the engine's layer calls, the real rows they held, and their mean;
- ``eek_sequence_queue_seconds``: per sequence, from its submission to the engine to its
  admission (embedded into the first layer); ``eek_sequence_inference_seconds``: from its
  admission to its exit (histograms, from the engine's :mod:`earlyexit_kernels.engine.stream.timings`;
  a one-text request is one sequence).

The process's memory, read when scraped (:mod:`.memory_trim`): ``eek_process_resident_bytes``
(``VmRSS``), and where the C library is glibc its own account of the heap:
``eek_heap_in_use_bytes`` (what the process holds), ``eek_heap_free_bytes`` (what the allocator
keeps for reuse) and ``eek_heap_mapped_bytes`` (blocks mapped on their own). Resident memory that
grows while the bytes in use stay flat is the allocator's, not the server's.

With an audit (``eek serve --audit-fraction F``, :mod:`earlyexit_kernels.engine.entry.audit`):

- ``eek_audit_fraction``: F; ``eek_audit_sequences_total``: sequences also run by the full model;
  ``eek_audit_disagreements_total``: their disagreements with it (multi-label: the fractions of
  labels decided otherwise, summed); ``eek_audit_disagreement_rate``: the one over the other;
- ``eek_audit_disagreement_bound``: its upper ``eek_audit_confidence`` bound (1 before any);
- ``eek_audit_budget`` (only with a budget: the certificate's of ``eek_fit.json`` or
  ``--audit-budget``) and ``eek_audit_over_budget`` (1 while the disagreements show the risk over
  it, as the warning says; 0 otherwise);
- ``eek_audit_full_model_seconds_total``: the full model's time on them (the audit's cost);
  ``eek_audit_skipped_total``: sequences chosen but not audited (the audit's queue was full);
- from the labels of audited sequences (``POST /feedback``, :mod:`.feedback`):
  ``eek_audit_labelled_total``, ``eek_audit_exit_wrong_full_right_total``,
  ``eek_audit_exit_right_full_wrong_total``, ``eek_audit_accuracy_lost`` (the difference of the two
  over the first, a fraction) and ``eek_audit_accuracy_lost_bound`` (its upper bound, 1 before any);
  ``eek_audit_accuracy_budget`` and ``eek_audit_accuracy_over_budget`` where the folder's certificate
  is on accuracy lost.

With online re-certification, ``eek_policy_*`` (:mod:`.policy_metrics`).

Each app has its own registry, so several apps in one process never collide.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Counters for one app; ``engine_stats`` and ``queue_depth`` are read when scraped."""

    def __init__(
        self, num_layers: int, engine_stats: Callable, queue_depth: Callable[[], int], audit=None, certificate=None
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("eek_requests", "Answered /predict requests", ["status"], registry=self.registry)
        self.sequences = Counter("eek_sequences", "Sequences classified", registry=self.registry)
        self.latency = Histogram(
            "eek_request_duration_seconds",
            "Per answered request: from its arrival to its answer",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_spans = _request_span_histograms(self.registry, Histogram)
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
        self.registry.register(_EngineTimes(engine_stats))
        self.registry.register(_ProcessMemory())
        if audit is not None:
            self._audit_metrics(audit, Gauge)
        if certificate is not None:  # online re-certification (server/policy_metrics.py)
            from earlyexit_kernels.integrations.server.policy_metrics import PolicyMetrics

            self.registry.register(PolicyMetrics(certificate, num_layers))

    def _audit_metrics(self, audit, Gauge) -> None:
        """Read from the :class:`~earlyexit_kernels.engine.entry.audit.AuditWatch` ``audit`` when scraped."""
        gauges = {
            "eek_audit_fraction": ("Fraction of the sequences also run by the full model", lambda: audit.fraction),
            "eek_audit_sequences_total": ("Sequences also run by the full model", lambda: audit.audited),
            "eek_audit_disagreements_total": (
                "Audited sequences whose early exit predicts otherwise than the full model (multi-label: "
                "fractions of labels, summed)",
                lambda: audit.disagreements,
            ),
            "eek_audit_disagreement_rate": (
                "Disagreement of the early exit with the full model on the audited sequences",
                lambda: audit.rate or 0.0,
            ),
            "eek_audit_disagreement_bound": (
                "Upper confidence bound on the disagreement (eek_audit_confidence; 1 before any audited sequence)",
                audit.bound,
            ),
            "eek_audit_confidence": ("Confidence of eek_audit_disagreement_bound", lambda: audit.confidence),
            "eek_audit_full_model_seconds_total": (
                "Time the full model took on the audited sequences",
                lambda: audit.full_seconds,
            ),
            "eek_audit_skipped_total": (
                "Sequences chosen for the audit but not audited (its queue was full)",
                lambda: audit.skipped,
            ),
        }
        if audit.budget is not None:
            gauges["eek_audit_budget"] = ("Budget of the disagreement (a fraction)", lambda: audit.budget)
            gauges["eek_audit_over_budget"] = (
                "1 while the audited disagreements show the risk over the budget (the warning's condition)",
                lambda: float(bool(audit.over_budget)),
            )
        # the audited inputs whose labels came (POST /feedback): accuracy lost against the full model
        gauges["eek_audit_labelled_total"] = ("Audited sequences whose label is known", lambda: audit.labelled)
        gauges["eek_audit_exit_wrong_full_right_total"] = (
            "Labelled audited sequences the early exit got wrong and the full model right",
            lambda: audit.exit_wrong_full_right,
        )
        gauges["eek_audit_exit_right_full_wrong_total"] = (
            "Labelled audited sequences the early exit got right and the full model wrong",
            lambda: audit.exit_right_full_wrong,
        )
        gauges["eek_audit_accuracy_lost"] = (
            "Accuracy lost by the early exit against the full model on the labelled audited sequences (a fraction)",
            lambda: audit.accuracy_lost or 0.0,
        )
        gauges["eek_audit_accuracy_lost_bound"] = (
            "Upper confidence bound on the accuracy lost (eek_audit_confidence; 1 before any labelled sequence)",
            audit.accuracy_bound,
        )
        if audit.accuracy_budget is not None:
            gauges["eek_audit_accuracy_budget"] = (
                "Budget of the accuracy lost (a fraction): the certificate's",
                lambda: audit.accuracy_budget,
            )
            gauges["eek_audit_accuracy_over_budget"] = (
                "1 while the labelled audited sequences show the accuracy lost over its budget (the warning's condition)",
                lambda: float(bool(audit.accuracy_over_budget)),
            )
        for name, (documentation, read) in gauges.items():
            Gauge(name, documentation, registry=self.registry).set_function(read)

    def record_sequence(self, exit_layer: int, layers_run: int) -> None:
        self.sequences.inc()
        self.exit_layer.observe(exit_layer)
        self.layers_run.inc(layers_run)

    def record_request(self, spans: dict[str, float]) -> None:
        """One answered request's seconds by span (:meth:`~.request_costs.RequestCosts.spans`: ``total`` and
        each of the ``eek_request_*_seconds`` spans)."""
        self.latency.observe(spans["total"])
        for name, histogram in self.request_spans.items():
            if name in spans:  # every span of a request whose sequences ran
                histogram.observe(spans[name])

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _request_span_histograms(registry, Histogram) -> dict:
    """``eek_request_{tokenization,queue,inference,layers,waiting,answer}_seconds``, by span name (the
    total is ``eek_request_duration_seconds``)."""
    documentation = {
        "tokenization": "Per answered request: from its arrival until its texts are tokenized (body read and parsed "
        "included)",
        "queue": "Per answered request: from its texts tokenized until the engine admits its first sequence",
        "inference": "Per answered request: from the admission of its first sequence until its last sequence's answer",
        "layers": "Per answered request: of its inference, the seconds its sequence longest in layer calls spent in "
        "the calls that held it",
        "waiting": "Per answered request: of its inference, the rest: its sequences waiting for a layer call",
        "answer": "Per answered request: from its last sequence's answer until its own (handing back, formatting)",
    }
    return {
        name: Histogram(f"eek_request_{name}_seconds", text, buckets=_LATENCY_BUCKETS, registry=registry)
        for name, text in documentation.items()
    }


class _EngineTimes:
    """The engine's per-sequence time histograms, read when scraped (a custom collector: the
    engine thread counts them, and nothing is copied between scrapes)."""

    _HISTOGRAMS = {
        "eek_sequence_queue_seconds": (
            "queue_seconds",
            "Per sequence: from its submission to the engine to its admission (embedded into layer 1)",
        ),
        "eek_sequence_inference_seconds": ("inference_seconds", "Per sequence: from its admission to its exit"),
    }

    def __init__(self, engine_stats: Callable):
        self._engine_stats = engine_stats

    def describe(self):
        from prometheus_client.core import HistogramMetricFamily

        return [HistogramMetricFamily(name, documentation) for name, (_, documentation) in self._HISTOGRAMS.items()]

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        try:
            stats = self._engine_stats()
        except AttributeError:  # no engine yet (the app has not started)
            return
        for name, (attribute, documentation) in self._HISTOGRAMS.items():
            histogram = getattr(stats, attribute)
            yield HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total)


class _ProcessMemory:
    """The process's resident memory and glibc's account of its heap, read when scraped."""

    _GAUGES = {
        "eek_heap_in_use_bytes": ("in_use", "Bytes the process holds on glibc's heap (mallinfo2)"),
        "eek_heap_free_bytes": ("free", "Free bytes glibc's heap keeps for reuse (mallinfo2)"),
        "eek_heap_mapped_bytes": ("mapped", "Bytes of the blocks glibc mapped on their own (mallinfo2)"),
    }

    def describe(self):
        from prometheus_client.core import GaugeMetricFamily

        names = {"eek_process_resident_bytes": "Resident memory of the process (VmRSS)"}
        names |= {name: documentation for name, (_, documentation) in self._GAUGES.items()}
        return [GaugeMetricFamily(name, documentation) for name, documentation in names.items()]

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from earlyexit_kernels.integrations.server.memory_trim import heap_account, resident_bytes

        resident = resident_bytes()
        if resident is not None:
            yield GaugeMetricFamily(
                "eek_process_resident_bytes", "Resident memory of the process (VmRSS)", value=resident
            )
        heap = heap_account()
        if heap is None:  # not glibc, or a glibc before 2.33
            return
        for name, (key, documentation) in self._GAUGES.items():
            yield GaugeMetricFamily(name, documentation, value=heap[key])
