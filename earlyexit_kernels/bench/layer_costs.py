"""The time of one encoder layer at each row count, measured as the graphed step runs it.

The layer runs through the family's adapter (its ``layer_mask``, its ``run_layer``), as the
engine runs it, on random hidden states ``[n, S, H]`` (one padded position per row when
``padded``: the masked kernel path). On a GPU each row count's call is captured once in a CUDA
graph (the graphed step's :class:`~earlyexit_kernels.engine.graphed.step_graphs.StepGraphs`: warm-up on
the capture stream, one memory pool for all) and timed by CUDA events around ``replays``
back-to-back replays, the queue kept ahead by an untimed lead-in, so what is timed is the device's
time per layer, not the host's launch of one call and its synchronisation (a single eager call of
a small layer times the host). On the CPU the same calls run eagerly, timed by the clock around
``replays`` calls. Each repetition times every row count once, in an order rotated from one
repetition to the next, so that a change of machine load or clock hits all counts alike; a
count's time is the median over the repetitions and its spread their interquartile range
(:class:`~earlyexit_kernels.engine.graphed.cost_table.LayerCostTable`).

For a family whose layers differ (ModernBERT's global and sliding-window layers), a call runs one
period of the layer types (:func:`probe_layers`), each on the same input.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable

import torch

from earlyexit_kernels.bench.results import cpu_name
from earlyexit_kernels.bench.timing import synchronize
from earlyexit_kernels.engine.graphed.cost_table import LayerCostTable

__all__ = [
    "REPEATS",
    "REPLAYS",
    "probe_layers",
    "probe_mask",
    "layer_call",
    "captured",
    "all_captured",
    "time_round",
    "measure_layer_costs",
    "device_name",
]

REPEATS = 15  # repetitions of a table's measurement (its median and interquartile range)
REPLAYS = 20  # calls timed back to back in one repetition


def probe_layers(adapter) -> list[int]:
    """The encoder layers a probe runs: ``[0]``, or one period of ``config.layer_types`` when they differ."""
    kinds = list(getattr(adapter.model.config, "layer_types", None) or [])
    if len(set(kinds)) <= 1:
        return [0]
    period = next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    return list(range(period))


def probe_mask(n: int, s: int, device) -> torch.Tensor:
    """A ``[n, s]`` mask with one padded position per row (the last, where ``s > 1``)."""
    mask = torch.ones(n, s, dtype=torch.long, device=device)
    if s > 1:
        mask[:, -1] = 0
    return mask


def layer_call(adapter, hidden: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> Callable[[], None]:
    """A no-argument callable running the :func:`probe_layers` on ``hidden`` [n, s, H] with the
    layer mask of ``mask`` [n, s] (None: no padding), made once here."""
    layer_mask = adapter.layer_mask(mask, dtype)
    layers = probe_layers(adapter)

    def run():
        for index in layers:  # each on the same input: the time of the layers, not of a chain
            adapter.run_layer(index, hidden, layer_mask)

    return run


def captured(calls: dict, device: torch.device) -> dict:
    """``calls`` as they are on the CPU; on CUDA each a replay of its own CUDA graph, captured at its
    first call (all in one memory pool: they run one after another and keep nothing between calls).
    A call that cannot be captured runs eagerly, with one warning saying why (:func:`all_captured`)."""
    if torch.device(device).type != "cuda":
        return dict(calls)
    from earlyexit_kernels.engine.graphed.step_graphs import StepGraphs

    graphs = StepGraphs(torch.device(device))
    return {key: _Replay(graphs, key, call) for key, call in calls.items()}


class _Replay:
    """One call captured in ``graphs`` under ``key`` (at its first call), then replayed."""

    def __init__(self, graphs, key, call):
        self.graphs, self.key, self.call = graphs, key, call

    def __call__(self) -> None:
        self.graphs.run(self.key, self.call)


def all_captured(calls: dict) -> bool:
    """Whether every call of ``calls`` (from :func:`captured`, each called once) replays a CUDA graph."""
    replays = [c for c in calls.values() if isinstance(c, _Replay)]
    return bool(replays) and len(replays) == len(calls) and all(c.graphs.uncapturable is None for c in replays)


class _Clock:
    """Seconds between two marks: the host's clock, with the device synchronised where it has a queue."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def settle(self) -> None:
        synchronize(self.device)


class _EventClock(_Clock):
    """Seconds between two CUDA events recorded on the current stream: the device's time."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3  # milliseconds


def time_round(calls: dict, replays: int, device: torch.device, order: Iterable[Hashable] | None = None) -> dict:
    """Seconds per call of each of ``calls`` (in ``order``, default theirs): ``replays`` calls back to
    back between two marks, divided. CUDA events on CUDA, after an untimed lead-in of the first
    call's ``replays`` so that the device's queue never starts empty; the host's clock elsewhere."""
    if replays < 1:
        raise ValueError(f"replays must be 1 or more; got {replays}")
    device = torch.device(device)
    order = list(calls) if order is None else list(order)
    clock = _EventClock(device) if device.type == "cuda" else _Clock(device)
    clock.settle()
    if device.type == "cuda" and order:
        for _ in range(replays):
            calls[order[0]]()
    marks = {}
    for key in order:
        call = calls[key]
        start = clock.mark()
        for _ in range(replays):
            call()
        marks[key] = (start, clock.mark())  # an event on CUDA, read after the round; the clock now elsewhere
    clock.settle()
    return {key: clock.seconds(*marks[key]) / replays for key in order}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name with its cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure_layer_costs(
    adapter,
    rows: Iterable[int],
    seq_len: int,
    *,
    device,
    dtype: torch.dtype,
    padded: bool = False,
    repeats: int = REPEATS,
    replays: int = REPLAYS,
    seed: int = 0,
) -> LayerCostTable:
    """The layer-cost table of ``adapter``'s encoder layer at each of ``rows`` rows and ``seq_len`` positions.

    The row counts share one input (``[max(rows), seq_len, H]``, each count its first rows). Each
    count's call is made and, on CUDA, captured once (:func:`captured`), then ``repeats`` rounds of
    :func:`time_round` time every count, in an order rotated by one each round. Runs under
    ``torch.inference_mode``."""
    rows = sorted(set(int(n) for n in rows))
    if not rows or rows[0] < 1:
        raise ValueError(f"row counts are 1 or more; got {rows[:3]}")
    if repeats < 1:
        raise ValueError(f"repeats must be 1 or more; got {repeats}")
    device = torch.device(device)
    with torch.inference_mode():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        hidden = torch.randn(rows[-1], seq_len, adapter.hidden_size, generator=generator).to(device, dtype)
        mask = probe_mask(rows[-1], seq_len, device) if padded else None
        calls = {n: layer_call(adapter, hidden[:n], None if mask is None else mask[:n], dtype) for n in rows}
        calls = captured(calls, device)
        for call in calls.values():  # warm-up; on CUDA the capture
            call()
        synchronize(device)
        samples: dict[int, list[float]] = {n: [] for n in rows}
        for rep in range(repeats):
            shift = rep % len(rows)
            for n, seconds in time_round(calls, replays, device, rows[shift:] + rows[:shift]).items():
                samples[n].append(seconds)
    quartiles = {n: _quartiles(v) for n, v in samples.items()}
    config = adapter.model.config
    return LayerCostTable(
        seconds={n: q[1] for n, q in quartiles.items()},
        spread={n: q[2] - q[0] for n, q in quartiles.items()},
        seq_len=seq_len,
        device=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        model=f"{config.model_type} {getattr(config, 'num_hidden_layers', '?')} layers",
        hidden_size=adapter.hidden_size,
        padded=padded,
        captured=all_captured(calls),
        repeats=repeats,
        replays=replays,
        layers=len(probe_layers(adapter)),
    )
