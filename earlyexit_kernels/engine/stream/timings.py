"""Where each sequence's time went in the continuous engine, as cumulative histograms.

Per sequence, in seconds (``time.perf_counter()``): its *queue* time, from its submission
to its admission (embedded into layer 1), and its *inference* time, from its admission to
its exit. A server reads them when scraped (``eek_sequence_queue_seconds``,
``eek_sequence_inference_seconds`` at ``/metrics``); counts only, so memory stays fixed.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "SecondsHistogram"]

# Upper bounds of the buckets, in seconds (the server's latency buckets).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class SecondsHistogram:
    """Counts of durations per bucket: ``counts[i]`` those in ``(bounds[i-1], bounds[i]]``, the last
    past every bound (Prometheus' ``+Inf``); ``total`` their sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or under it)`` per bucket, ``"+Inf"`` last: Prometheus' buckets."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out
