"""What a bucket plan makes the graphed step run for an exit pattern, and what it costs by a layer-cost table.

The graphed step runs layer ``l`` on a bucket of rows chosen by
:class:`~earlyexit_kernels.engine.graphed.buckets.SurvivorLag` from the survivor counts published
``lag`` layers before. :func:`plan_cost` drives that same object with the counts an exit pattern
gives (the rows with ``exit_layer > l`` stay after layer ``l``), published after every layer but
the last, as a policy that may let rows leave at every layer does (a threshold: ``Entropy``,
``MaxProb``; the suite's Entropy variant). ``Scheduled`` knows its counts on the host and picks
each bucket without a lag: simulate it with ``lag=0``.

From it: the row-layers run (the buckets' sum over the layers), the row-layers needed (the rows
alive at each layer: ``sum(exit_layer)``), and, with a layer-cost table ``t`` (seconds of one
layer by row count, :mod:`.layer_costs`), the predicted layer time ``sum_l t(bucket_l)`` against
the ideal ``sum_l t(n_l)`` at the exact counts and the full model's ``L * t(B)``. Only the
encoder layers are counted (as in :mod:`.ideal`): the exit step, the gather and the launches
are what the graphed step adds on top.

Refilling a partly filled bucket with other rows (a later batch's, or a merge of two batches at
the same layer) is not simulated: the rows of a bucket run the same layer, so a refill needs rows
waiting at that layer, which is a property of a stream and a scheduler (the continuous engine),
not of one batch's exit pattern; whether it pays is then a question of the GPU's time per
refilled row against the gather, for a GPU to answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES, ReadyCount, SurvivorLag

__all__ = ["PlanCost", "plan_cost"]


@dataclass(frozen=True)
class PlanCost:
    """One forward of a pattern under a bucket plan: the bucket of each layer run, the rows alive
    at each layer, and (with a table) the predicted, ideal and full layer seconds."""

    buckets: tuple[int, ...]
    needed: tuple[int, ...]
    seconds: float | None = None  # sum of t(bucket) over the layers run
    ideal_seconds: float | None = None  # sum of t(rows alive) over the layers any row runs
    full_seconds: float | None = None  # L * t(B): the full model's layers

    @property
    def row_layers_run(self) -> int:
        return sum(self.buckets)

    @property
    def row_layers_needed(self) -> int:
        return sum(self.needed)

    @property
    def row_fraction(self) -> float:
        """Row-layers needed / run: the share of the rows run that were alive."""
        return self.row_layers_needed / self.row_layers_run

    @property
    def time_fraction(self) -> float | None:
        """Ideal / predicted layer time: the fraction of the shape ideal the plan can reach."""
        return None if self.seconds is None else self.ideal_seconds / self.seconds

    @property
    def speedup(self) -> float | None:
        """Full / predicted layer time."""
        return None if self.seconds is None else self.full_seconds / self.seconds


def _layers(exit_layers, num_layers: int) -> list[int]:
    layers = [int(x) for x in (exit_layers.tolist() if hasattr(exit_layers, "tolist") else exit_layers)]
    if not layers:
        raise ValueError("an exit pattern has at least one row")
    if min(layers) < 1 or max(layers) > num_layers:
        raise ValueError(f"exit layers are in 1..{num_layers}; got {min(layers)}..{max(layers)}")
    return layers


def plan_cost(
    exit_layers,
    num_layers: int,
    layer_seconds: Mapping[int, float] | None = None,
    *,
    sizes: tuple[int, ...] | None = DEFAULT_SIZES,
    lag: int = 1,
) -> PlanCost:
    """The buckets the graphed step runs for rows exiting at ``exit_layers`` (1..``num_layers``
    each: a sequence or a tensor) under the plan ``sizes``, ``lag``, and their cost by
    ``layer_seconds`` (``{rows: seconds}``, e.g. a table's ``seconds``; None: no times). A row count
    the plan or the ideal needs and the table lacks is a ``KeyError`` naming it."""
    layers = _layers(exit_layers, num_layers)
    batch = len(layers)
    survivors = SurvivorLag(batch, lag=lag, sizes=sizes)
    needed = []
    for layer in range(1, num_layers + 1):
        if not survivors.bucket_before(layer):
            break
        needed.append(sum(1 for x in layers if x >= layer))
        if layer < num_layers:
            stay = sum(1 for x in layers if x > layer)
            survivors.publish(layer, ReadyCount(lambda n=stay: n))
    buckets = tuple(survivors.buckets)
    if layer_seconds is None:
        return PlanCost(buckets, tuple(needed))

    def t(rows: int) -> float:
        if rows not in layer_seconds:
            raise KeyError(f"the layer-cost table has no time at {rows} rows, which this plan or its ideal runs")
        return layer_seconds[rows]

    return PlanCost(
        buckets,
        tuple(needed),
        seconds=sum(t(b) for b in buckets),
        ideal_seconds=sum(t(n) for n in needed if n),
        full_seconds=num_layers * t(batch),
    )
