"""The two ideals an early-exit forward is compared with.

``ideal_layers = L * B / sum(exit_layer)``: the speed-up if time were proportional to the
number of (sequence, layer) evaluations. It is what the papers report.

``ideal_shape``: the speed-up if the only cost were the encoder layers, each run at the
shape it really has after compaction and trimming. With ``n_l`` the sequences still
active at layer ``l`` (``exit_layer >= l``) and ``S_l`` the longest of their lengths
(``S`` without padding), and ``t(n, s)`` the measured time of one encoder layer on
``[n, s, H]`` (with the padding mask when the pattern is padded)::

    ideal_shape = L * t(B, S) / sum_l t(n_l, S_l)

For a family whose layers differ (ModernBERT: global and sliding-window layers,
``config.layer_types``), ``t`` is the time of one period of the layer types (layers
``0..p-1``) instead of one layer: every ``t`` is then ``p`` times the mean layer time of that
shape, which cancels in the ratio. The probes run through the family's adapter (its mask,
its ``run_layer``), as the engine does.

The full model runs every layer at ``(B, S)``. Small batches use the hardware worse, so
``ideal_shape`` is below ``ideal_layers`` when the batch shrinks to a few rows, and above
it when trimming the padding saves more than the row count says. Embeddings, heads and
the exit step are left out of both: they are what the engine must keep small.

The layer times are measured in the same repetitions as the methods (each repetition
times every method once and every needed layer shape once, :func:`time_probes`), so both
see the same machine load; ``t`` is the median over the repetitions. On the CPU a shape's
time is one eager call. On a GPU one eager call of a small layer times the host (its
launches and the synchronisation around it, about the same from 1 row to 64: timed that way,
the geometric pattern's shape ideal at B = 64 in bf16 read 0.82-1.15 in the H100 sessions of
2026-11-26/27, ``benchmarks/results/nvidia_h100_80gb_hbm3/``, against a layer ideal of
1.67), so there each shape's layer is captured in a CUDA
graph, as the graphed step runs it, and timed by CUDA events around :data:`GPU_REPLAYS`
replays (:mod:`.layer_costs`, which also measures a whole table of row counts for the
bucket plan).
"""

from __future__ import annotations

import torch

from earlyexit_kernels.bench.layer_costs import captured, layer_call, probe_layers, probe_mask, time_round
from earlyexit_kernels.bench.patterns import ExitPattern

__all__ = [
    "ideal_layers",
    "active_shapes",
    "probe_layers",
    "layer_probe",
    "shape_probes",
    "time_probes",
    "ideal_shape",
    "GPU_REPLAYS",
]

GPU_REPLAYS = 10  # graph replays timed together per shape and repetition on CUDA


def ideal_layers(pattern: ExitPattern, num_layers: int) -> float:
    return num_layers * pattern.exit_layers.numel() / float(pattern.exit_layers.sum())


def active_shapes(pattern: ExitPattern, num_layers: int, seq_len: int) -> list[tuple[int, int]]:
    """``(n_l, S_l)`` for ``l = 1..L`` (only layers some sequence still runs)."""
    shapes = []
    for layer in range(1, num_layers + 1):
        active = pattern.exit_layers >= layer
        n = int(active.sum())
        if n == 0:
            break
        s = int(pattern.lengths[active].max()) if pattern.padded else seq_len
        shapes.append((n, s))
    return shapes


def layer_probe(adapter, n: int, s: int, padded: bool, device: torch.device, dtype: torch.dtype):
    """A no-argument callable running the :func:`probe_layers` on ``[n, s, H]`` (masked when ``padded``)."""
    hidden = torch.randn(n, s, adapter.hidden_size, device=device, dtype=dtype)
    mask = probe_mask(n, s, device) if padded else None  # one padded position per row: the masked kernel path
    return layer_call(adapter, hidden, mask, dtype)


def shape_probes(pattern: ExitPattern, num_layers: int, seq_len: int, adapter, device, dtype) -> dict:
    """``{(n, s): callable}`` for the full shape ``(B, S)`` and every active shape of ``pattern``; on
    CUDA each a replay of its CUDA graph, captured at its first call (:func:`.layer_costs.captured`)."""
    batch = pattern.exit_layers.numel()
    shapes = {(batch, seq_len), *active_shapes(pattern, num_layers, seq_len)}
    probes = {shape: layer_probe(adapter, *shape, pattern.padded, device, dtype) for shape in sorted(shapes)}
    return captured(probes, device)


def time_probes(probes: dict, device) -> dict:
    """One repetition of :func:`shape_probes`' probes: ``{(n, s): seconds of one layer}``. On CUDA
    :data:`GPU_REPLAYS` replays of each graph between two CUDA events; elsewhere one call each,
    timed by the clock (:func:`.layer_costs.time_round`)."""
    replays = GPU_REPLAYS if torch.device(device).type == "cuda" else 1
    return time_round(probes, replays, device)


def ideal_shape(pattern: ExitPattern, num_layers: int, seq_len: int, layer_time: dict) -> float:
    """The shape-aware ideal from ``layer_time[(n, s)]``, the measured seconds of one layer."""
    batch = pattern.exit_layers.numel()
    full = num_layers * layer_time[(batch, seq_len)]
    early = sum(layer_time[shape] for shape in active_shapes(pattern, num_layers, seq_len))
    return full / early
