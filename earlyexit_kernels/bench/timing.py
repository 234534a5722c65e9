"""Wall-clock timing, percentiles and peak memory of one call.

Every timed call is bracketed by a device synchronisation (``torch.cuda.synchronize``
on CUDA; CPU ops are synchronous). Peak memory is what the call allocates above what
was allocated when it started:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus ``memory_allocated()`` before;
- CPU: the running sum of the allocation and free events of torch's CPU allocator,
  recorded by ``torch.profiler`` with ``profile_memory=True``, in time order (the
  process RSS is useless here: glibc keeps freed pages, so its high-water mark does
  not move after the first large run). Only the torch allocator is counted, not
  Python objects. ``None`` when the profiler does not expose the events. The
  profiler's own log lines (``profiler_start``/``profiler_stop``, two per call with some
  torch builds, written by C++ to file descriptor 2) are kept off the terminal; anything
  else written to stderr during the call is passed on.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

__all__ = ["synchronize", "timed_call", "percentiles", "peak_memory", "time_loop", "median_us"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: torch.device):
    """``(seconds, result)`` of one call of ``fn()``, synchronised on both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_loop(fn: Callable, device: torch.device, iterations: int) -> float:
    """Mean seconds per call over ``iterations`` back-to-back calls (for microsecond-scale ops)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def median_us(fn: Callable, repeats: int, warmup: int = 5) -> float:
    """Median microseconds of ``repeats`` separately timed calls of ``fn()`` after ``warmup`` untimed ones (CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def percentiles(values: list[float]) -> dict[str, float]:
    """p20, p50 and p80 (nearest rank; p50 is the median for an odd count)."""
    data = sorted(values)

    def pick(p: float) -> float:
        return data[min(len(data) - 1, max(0, math.ceil(p * len(data)) - 1))]

    return {"p20": pick(0.2), "p50": pick(0.5), "p80": pick(0.8)}


def peak_memory(fn: Callable, device: torch.device) -> int | None:
    """Bytes allocated by ``fn()`` at its peak, above what was allocated when it started."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with _without_profiler_logs(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except (AttributeError, RuntimeError, TypeError):
        return None
    if not events:
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


#: a log line of the profiler's C++ side (kineto): ``USDT:2026-11-22 13:56:07 8460:8460 X.cpp:52] profiler_start``
_PROFILER_LOG = re.compile(rb"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_profiler_logs():
    """Send file descriptor 2 to a temporary file meanwhile; pass on what is not a profiler log line."""
    import sys

    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = b"".join(line for line in sink.read().splitlines(keepends=True) if not _PROFILER_LOG.match(line))
            if kept:
                os.write(2, kept)
