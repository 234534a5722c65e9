"""Which batch bucket the graphed step runs a layer in, from survivor counts that arrive late.

The graphed step (:mod:`earlyexit_kernels.engine.graphed.static_step`) keeps a batch in a fixed bucket
of rows, exited rows moved to the tail as dead rows, so that every (layer, bucket) step has
the same shapes whatever the exits and can be captured once in a CUDA graph. After a layer
where rows may leave, the step publishes how many stay without the host waiting: on a GPU the
count is copied to pinned memory behind an event. The host reads a count only ``lag`` layers
later, by which time the device has finished that layer while it runs the next one, so the
device never idles behind a read-back. The count is an upper bound of the rows alive when it
is used (rows only leave), and alive rows sit first, so the next layer may run on the smallest
bucket that holds it.

Sizes follow vLLM's captured batch sizes: 1, 2, 4, then steps of 8 to 64, of 32 to 256 and of
64 beyond. The choice of bucket is deterministic: it depends on the counts and the lag, never
on how fast the device ran, so the same inputs run the same shapes every time.

On the CPU nothing is captured, and fixed shapes buy nothing; there the plan is every count its
own bucket, read at once (``sizes=None``, lag 0): the same step on the exact step's shapes, so
that it gives the exact step's bits (a small GEMM's rows round differently with the number of
rows on MKL: a head's Linear on 10 rows against the first 10 of 16).

Sizes from a layer-cost table (:func:`sizes_from_table`): a GPU runs a layer's GEMMs in waves of
tiles, so a bucket of 40 rows can cost what one of 64 does, and then runs more rows for nothing
and costs one more capture per layer. From the measured time of one layer at each row count
(:mod:`earlyexit_kernels.engine.graphed.cost_table`), a size is kept only where the layer is faster than at
the next larger size kept by more than the measurement's own noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from earlyexit_kernels.engine.graphed.cost_table import LayerCostTable

__all__ = [
    "DEFAULT_SIZES",
    "bucket_for",
    "default_plan",
    "sizes_from_table",
    "sizes_from_file",
    "PublishedCount",
    "ReadyCount",
    "SurvivorLag",
]

DEFAULT_SIZES = (1, 2, 4, *range(8, 65, 8), *range(96, 257, 32))
_STEP_BEYOND = 64  # past the largest listed size, buckets are multiples of this


def default_plan(device_type: str) -> tuple[tuple[int, ...] | None, int]:
    """``(sizes, lag)`` of the graphed step on a device: fixed buckets and lag 1 on CUDA, where the
    steps are captured; every count its own bucket and lag 0 elsewhere."""
    return (DEFAULT_SIZES, 1) if device_type == "cuda" else (None, 0)


def bucket_for(count: int, sizes: tuple[int, ...] | None = DEFAULT_SIZES) -> int:
    """The smallest bucket holding ``count`` rows (0 for none): a listed size, or past the largest
    a multiple of 64; ``count`` itself where ``sizes`` is None."""
    if count < 0:
        raise ValueError(f"a survivor count is never negative; got {count}")
    if count == 0 or sizes is None:
        return count
    for size in sizes:
        if size >= count:
            return size
    return -(-count // _STEP_BEYOND) * _STEP_BEYOND


def sizes_from_table(table) -> tuple[int, ...]:
    """Bucket sizes that each cost less than the next larger one, from a layer-cost table.

    ``table``: a :class:`~earlyexit_kernels.engine.graphed.cost_table.LayerCostTable` (or anything with its
    ``seconds`` and ``spread`` by row count). The largest row count timed is kept; then, walking down
    the row counts, a count is kept where its median time is below that of the last size kept by more
    than the larger of the two interquartile ranges; the others are dropped, as a bucket that costs
    about what the next larger one costs saves nothing and costs a capture per layer. The margin is
    the measurement's own spread: for normal noise of standard deviation ``sd`` per repetition, the
    difference of two medians over ``r`` repetitions has a standard deviation of about
    ``1.25 sd sqrt(2 / r)`` and an interquartile range is ``1.35 sd``, so at 15 repetitions the margin
    is about three standard deviations of the difference. A time that does not fall (noise, a smaller
    count slower) never keeps a size. Past the largest size, :func:`bucket_for` goes on in multiples of 64."""
    seconds, spread = table.seconds, table.spread
    rows = sorted(seconds)
    if not rows:
        raise ValueError("an empty layer-cost table chooses no sizes")
    kept = [rows[-1]]
    for n in reversed(rows[:-1]):
        above = kept[-1]
        if seconds[above] - seconds[n] > max(spread[n], spread[above]):
            kept.append(n)
    return tuple(reversed(kept))


def sizes_from_file(path: str | Path) -> tuple[int, ...]:
    """:func:`sizes_from_table` of the layer-cost table saved as JSON at ``path``."""
    return sizes_from_table(LayerCostTable.load(path))


class PublishedCount(Protocol):
    """A survivor count on its way to the host."""

    def wait(self) -> int:
        """The count, waiting for the device to have written it if it has not yet."""


class ReadyCount:
    """A count already on the host (the CPU's static step: the device is the host)."""

    def __init__(self, read):
        self._read = read

    def wait(self) -> int:
        return int(self._read())


class SurvivorLag:
    """The bucket of each layer of one forward, from the counts published ``lag`` layers before.

    ``batch``: rows at layer 1. ``lag``: how many layers a count waits before it is read (0: the
    count of layer ``l - 1`` picks the bucket of layer ``l``; 1 on a GPU, so that the device runs
    layer ``l - 1`` while the host waits for the count of ``l - 2``).
    """

    def __init__(self, batch: int, *, lag: int, sizes: tuple[int, ...] | None = DEFAULT_SIZES):
        if lag < 0:
            raise ValueError(f"lag must be 0 or more layers; got {lag}")
        self.lag = lag
        self.sizes = sizes
        self.known = batch  # survivors as of the newest count read
        self._pending: list[tuple[int, PublishedCount]] = []  # (layer, count), oldest first
        self._last_published = 0
        self.buckets: list[int] = []  # the bucket chosen for each layer run, in order

    def publish(self, layer: int, count: PublishedCount) -> None:
        """The step of ``layer`` has queued the count of the rows that stay after it."""
        if layer <= self._last_published:
            raise ValueError(f"counts are published in layer order; layer {layer} came after {self._last_published}")
        self._last_published = layer
        self._pending.append((layer, count))

    def bucket_before(self, layer: int) -> int:
        """The bucket to run ``layer`` in (0: nobody is left, stop). Reads, waiting where needed,
        every count published at layer ``layer - 1 - lag`` or before."""
        due = layer - 1 - self.lag
        while self._pending and self._pending[0][0] <= due:
            _, count = self._pending.pop(0)
            self.known = min(self.known, count.wait())
        bucket = bucket_for(self.known, self.sizes)
        if bucket:
            self.buckets.append(bucket)
        return bucket
