"""Each (layer, bucket) step of the graphed step captured once in a CUDA graph, then replayed.

The step (:func:`earlyexit_kernels.engine.static_step._layer_step`) reads one half of fixed
buffers and writes the other, so it can run twice with the same result: the first time a key is
met it runs eagerly on a side stream (the warm-up CUDA graphs need: cuBLAS workspaces, Triton's
first compile, lazy module state), is captured, and the graph is replayed; later forwards only
replay. All graphs of a model share one memory pool, as vLLM's do: they run one after the other,
and what passes between them lives in the buffers, outside the pool.

A step that cannot be captured (an op that reads a value back, a kernel that launches outside
PyTorch's current stream) runs eagerly from then on for that shape, with one warning saying
why: slower, never wrong.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["StepGraphs", "PinnedCount"]


class StepGraphs:
    """The captured steps of one static batch, by key (layer, bucket, whether rows may leave)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.uncapturable: str | None = None  # why capture failed, once it has
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, step: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return
        if self.uncapturable is not None:
            step()
            return
        graph = self._capture(step)
        if graph is None:
            step()
            return
        self._graphs[key] = graph
        graph.replay()  # the step again, on the same buffers: the same state as the warm-up left
        self.replays += 1

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()  # the warm-up, a real run of the step
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                step()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            self.uncapturable = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"early exit's graphed step could not be captured in a CUDA graph ({self.uncapturable}); "
                f"its steps of this shape run uncaptured from now on, slower. Patch with step='exact' to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            torch.cuda.synchronize(self.device)
            return None
        self.captures += 1
        return graph


class PinnedCount:
    """A survivor count copied from the device to pinned host memory without blocking; read when
    the event behind the copy has passed (:class:`~earlyexit_kernels.engine.buckets.PublishedCount`).

    ``event`` and ``host_view`` (a numpy view of the pinned buffer: host memory, no tensor read-back)
    are made once with the buffers; this records the event again."""

    def __init__(self, device_count, host_count, event, host_view, index: int):
        host_count.copy_(device_count, non_blocking=True)
        event.record()
        self._event, self._host, self._index = event, host_view, index

    def wait(self) -> int:
        self._event.synchronize()
        return int(self._host[self._index])
