"""Each (layer, bucket) step of the graphed step captured once in a CUDA graph, then replayed.

The step (:func:`earlyexit_kernels.engine.graphed.static_step.layer_step`) reads one half of fixed
buffers and writes the other, so it can run twice with the same result: the first time a key is
met it runs eagerly on the capture stream (the warm-up CUDA graphs need: cuBLAS workspaces,
Triton's first compile, lazy module state), is captured on that same stream, and the graph is
replayed; later forwards only replay. All graphs of a model share one memory pool, as vLLM's do:
they run one after the other, and what passes between them lives in the buffers, outside the pool.

One capture stream per device for the whole process, and the warm-up runs on it: cuBLAS keeps a
workspace per (handle, stream), so a new stream per capture would allocate a new 32 MiB
workspace each time, and a workspace first allocated inside a capture would live in the graphs'
pool, where a later graph-tree recording (``torch.compile(mode="reduce-overhead")``) can free it
under the graphs already captured. The capture calls ``capture_begin``/``capture_end`` itself:
``torch.cuda.graph`` synchronizes the device, collects garbage and empties the allocator's cache
on every entry, a cost paid per shape and per layer here.

A step that cannot be captured (an op that reads a value back, a kernel that launches outside
PyTorch's current stream) runs eagerly from then on, with one warning saying why: slower, never
wrong. After one failed capture no graph is captured again in this process (:func:`capture_failure`):
on torch builds without the fix to ``cudaStreamEndCapture``'s pool handling, a failed capture
makes every later capture in the process trip an internal assert. What was captured, replayed or
run eagerly, and why, is counted in :class:`GraphStats` (the benchmark's rows report it).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["StepGraphs", "GraphStats", "PinnedCount", "capture_failure", "capture_stream", "on_device", "run_step"]

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# Why the first failed capture of this process failed: no graph is captured after it.
_FAILURE: str | None = None
# One capture at a time in the process: two captures interleaved on the one capture stream would
# record each other's work.
_CAPTURE_LOCK = threading.Lock()


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's one capture stream on ``device`` (made at its first capture)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    return stream


def on_device(device: torch.device):
    """``device`` made the current CUDA device for a block (nothing elsewhere). Events recorded without a stream,
    the pinned counts' among them, go on the current device's stream: with a model on ``cuda:1`` and the current
    device ``cuda:0`` (a server's thread starts there) an event would pass at once and a count be read stale."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capture_failure() -> str | None:
    """Why a capture failed in this process (then nothing is captured after it), or None."""
    return _FAILURE


@dataclass
class GraphStats:
    """What the graphed steps of one owner did: steps ``captured``, graph ``replays``, steps run
    ``eager`` (uncaptured: capture failed or was stopped), the first capture's seconds (warm-up
    included) and, where any step fell back, why."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    first_capture_s: float | None = None
    fallback: str | None = None


class StepGraphs:
    """The captured steps of one static batch, by key (layer, bucket, whether rows may leave, length).

    ``stats``: where the counts go (shared by an owner's graphs across shapes); a new one if None."""

    def __init__(self, device: torch.device, stats: GraphStats | None = None):
        self.device = device
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.stats = stats if stats is not None else GraphStats()
        self.uncapturable: str | None = None  # why capture failed here, once it has

    @property
    def captures(self) -> int:
        return self.stats.captures

    @property
    def replays(self) -> int:
        return self.stats.replays

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: tuple) -> bool:
        return key in self._graphs

    def forget(self, stale: Callable[[tuple], bool]) -> None:
        """Drop the graphs whose key is ``stale`` (they read buffers that are gone)."""
        for key in [key for key in self._graphs if stale(key)]:
            del self._graphs[key]

    def run(self, key: tuple, step: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            self.stats.replays += 1
            return
        if self.uncapturable is None and _FAILURE is not None:
            self._fall_back(f"capture stopped in this process after an earlier failure ({_FAILURE})")
        if self.uncapturable is not None:
            step()
            self.stats.eager += 1
            return
        graph = self._capture(step)
        if graph is None:
            step()  # again, uncaptured: the state the warm-up left, whatever the failed capture recorded
            self.stats.eager += 1
            return
        self._graphs[key] = graph
        graph.replay()  # the step again, on the same buffers: the same state as the warm-up left
        self.stats.replays += 1

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        global _FAILURE
        start = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        stream = capture_stream(self.device)
        with _CAPTURE_LOCK:
            stream.wait_stream(current)
            failure = None
            with torch.cuda.stream(stream):
                step()  # the warm-up, a real run of the step, on the stream that captures it
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                try:
                    # thread_local: another thread's forward (a server's) may allocate or sync while
                    # this thread captures on its own stream; two captures never overlap (the lock)
                    graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
                    failure = err
                else:
                    try:
                        step()
                    except Exception as err:  # noqa: BLE001
                        failure = err
                    try:
                        graph.capture_end()  # ends the capture whatever happened, so the stream is usable again
                    except Exception as err:  # noqa: BLE001
                        failure = failure or err
            current.wait_stream(stream)
        if failure is not None:
            reason = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0] if str(failure).strip() else ''}"
            _FAILURE = _FAILURE or reason
            self._fall_back(reason)
            torch.cuda.synchronize(self.device)
            return None
        self.stats.captures += 1
        if self.stats.first_capture_s is None:
            self.stats.first_capture_s = time.perf_counter() - start
        return graph

    def _fall_back(self, reason: str) -> None:
        self.uncapturable = reason
        self.stats.fallback = self.stats.fallback or reason
        warnings.warn(
            f"early exit's graphed step could not be captured in a CUDA graph ({reason}); its steps run "
            f"uncaptured from now on, slower. Patch with step='exact' to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )


def run_step(graphs: StepGraphs, key: tuple, step: Callable[[], None], capture: bool) -> None:
    """One step of a graphed forward: replayed from its CUDA graph (captured at the key's first use)
    where ``capture``, else run as it is (the CPU's twin). Every step the GPU launches as one graph
    goes through here, so that a test on the CPU can count each as the one launch it is there."""
    if capture:
        graphs.run(key, step)
    else:
        step()


class PinnedCount:
    """A survivor count in pinned host memory, read when the event recorded after the step that
    wrote it has passed (:class:`~earlyexit_kernels.engine.graphed.buckets.PublishedCount`). The step
    writes it there itself (the survivor gather's ``host_count``: the CUDA kernel writes the mapped
    memory directly), so nothing is copied or launched here.

    ``event`` and ``host_view`` (a numpy view of the pinned buffer: host memory, no tensor read-back)
    are made once with the buffers; this records the event again."""

    def __init__(self, event, host_view, index: int):
        event.record()
        self._event, self._host, self._index = event, host_view, index

    def wait(self) -> int:
        self._event.synchronize()
        return int(self._host[self._index])
