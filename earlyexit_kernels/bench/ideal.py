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
times every method once and every needed layer shape once), so both see the same
machine load; ``t`` is the median over the repetitions.
"""

from __future__ import annotations

import torch

from earlyexit_kernels.bench.patterns import ExitPattern

__all__ = ["ideal_layers", "active_shapes", "probe_layers", "layer_probe", "shape_probes", "ideal_shape"]


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


def probe_layers(adapter) -> list[int]:
    """The encoder layers a probe runs: ``[0]``, or one period of ``config.layer_types`` when they differ."""
    kinds = list(getattr(adapter.model.config, "layer_types", None) or [])
    if len(set(kinds)) <= 1:
        return [0]
    period = next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    return list(range(period))


def layer_probe(adapter, n: int, s: int, padded: bool, device: torch.device, dtype: torch.dtype):
    """A no-argument callable running the :func:`probe_layers` on ``[n, s, H]`` (masked when ``padded``)."""
    hidden = torch.randn(n, s, adapter.hidden_size, device=device, dtype=dtype)
    mask = None
    if padded:  # one padded position per row: the masked kernel path, as the engine runs it
        mask = torch.ones(n, s, dtype=torch.long, device=device)
        if s > 1:
            mask[:, -1] = 0
    layer_mask = adapter.layer_mask(mask, dtype)
    layers = probe_layers(adapter)
    if layers == [0]:
        return lambda: adapter.run_layer(0, hidden, layer_mask)

    def run():
        for index in layers:  # each on the same input: the time of the layers, not of a chain
            adapter.run_layer(index, hidden, layer_mask)

    return run


def shape_probes(pattern: ExitPattern, num_layers: int, seq_len: int, adapter, device, dtype) -> dict:
    """``{(n, s): callable}`` for the full shape ``(B, S)`` and every active shape of ``pattern``."""
    batch = pattern.exit_layers.numel()
    shapes = {(batch, seq_len), *active_shapes(pattern, num_layers, seq_len)}
    return {shape: layer_probe(adapter, *shape, pattern.padded, device, dtype) for shape in sorted(shapes)}


def ideal_shape(pattern: ExitPattern, num_layers: int, seq_len: int, layer_time: dict) -> float:
    """The shape-aware ideal from ``layer_time[(n, s)]``, the measured seconds of one layer."""
    batch = pattern.exit_layers.numel()
    full = num_layers * layer_time[(batch, seq_len)]
    early = sum(layer_time[shape] for shape in active_shapes(pattern, num_layers, seq_len))
    return full / early
