"""Which batch bucket the graphed step runs a layer in, from survivor counts that arrive late.

The graphed step (:mod:`earlyexit_kernels.engine.static_step`) keeps a batch in a fixed bucket
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
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["DEFAULT_SIZES", "bucket_for", "default_plan", "PublishedCount", "ReadyCount", "SurvivorLag"]

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
