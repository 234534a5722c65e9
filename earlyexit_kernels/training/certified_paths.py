"""The paths certified calibration walks: ordered candidates, chosen on rows apart from the calibration rows.

Certified calibration (:mod:`~earlyexit_kernels.training.certified_calibration`) tests an
ordered family of candidates from the most conservative to the most aggressive and keeps the
last one it certifies. Its guarantee holds for any order fixed before the calibration rows are
read. Two paths of the ``Entropy`` family:

- ``"global"``: one entropy threshold for every layer, on a fixed grid (data-free);
- ``"per_layer"``: one threshold per layer, each set on the *path rows* so that the rows a
  layer's head lets go disagree with the final classifier at most as often as a common level
  ``lam``; the candidates are ``lam`` on a fixed grid. Early heads that are confident and wrong
  get a lower threshold than later heads whose confident answers hold.

:func:`choose_path` builds the per-layer path on half of the path rows, scores both paths on
the other half (the fewest mean layers within the budget there, uncertified) and keeps the
per-layer path only where it saves at least :data:`MIN_GAIN` layers (the simplest path
otherwise), rebuilt on every path row. The path rows are the validation rows (early stopping,
the head choice), never the calibration rows: the path is fixed before the test, so the
certificate stays exact. The per-layer path is tried only where the path rows can resolve the
budget (:func:`per_layer_rows_needed`): on fewer, its first candidate after "never exit" admits
every row before the first error of a few dozen, which other rows then break, and the certificate
stops there (measured: 150 validation rows at 1% chose it, and certified nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.methods.policies import Entropy, ExitPolicy

__all__ = [
    "PATHS",
    "MIN_GAIN",
    "BUILD_ROWS_PER_BUDGET",
    "PathChoice",
    "per_layer_path",
    "per_layer_rows_needed",
    "choose_path",
    "supports_paths",
]

#: the paths, simplest first
PATHS = ("global", "per_layer")
#: the mean layers the per-layer path must save on the held-out path rows to be preferred
MIN_GAIN = 0.05
#: the largest per-exit disagreement level of the per-layer grid (past it every head lets every row go)
MAX_LEVEL = 0.5
#: the rows the per-layer thresholds are set on, in units of 1 / budget: three errors expected at the budget
BUILD_ROWS_PER_BUDGET = 3


def per_layer_rows_needed(budget: float) -> int:
    """The fewest path rows for which :func:`choose_path` tries the per-layer path at ``budget`` (a fraction):
    half of them set its thresholds, and must expect :data:`BUILD_ROWS_PER_BUDGET` errors at the budget."""
    return 2 * math.ceil(BUILD_ROWS_PER_BUDGET / max(budget, 1e-9) - 1e-9)


@dataclass
class PathChoice:
    """The path kept (``name``), its candidates in order, and the mean layers each path needed within the
    budget on the held-out half of the path rows (``layers``: path name -> mean layers, or None where no
    candidate of it was within the budget)."""

    name: str
    candidates: list[ExitPolicy]
    layers: dict[str, float | None]
    rows: int


def supports_paths(policy: ExitPolicy) -> bool:
    """Whether ``policy``'s family has a per-layer path (plain ``Entropy``; SkipGates keeps its own)."""
    return type(policy) is Entropy


def _entropies(record: ExitRecord, normalized: bool) -> torch.Tensor:
    """[L - 1, N] float64: each internal head's entropy, normalized by ln C where the policy is."""
    values = entropy(record.all_logits[:-1].float()).double()
    if normalized:
        values = values / math.log(record.all_logits.shape[-1])
    return values


def _disagrees(record: ExitRecord) -> torch.Tensor:
    """[L - 1, N] bool: each internal head's class differs from the final classifier's."""
    classes = record.all_logits.float().argmax(-1)
    return classes[:-1] != classes[-1]


def _thresholds_at(values: torch.Tensor, wrong: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """[len(levels)]: for one layer, the largest threshold whose admitted rows (entropy below it) disagree
    with the final classifier at most ``level`` of the time; 0 (never exits) where none is."""
    order = values.argsort()
    sorted_values, sorted_wrong = values[order], wrong[order].double()
    count = len(order)
    rate = sorted_wrong.cumsum(0) / torch.arange(1, count + 1, dtype=torch.float64)
    # cut between two sorted values (equal values are admitted together: only the last of a run cuts)
    upper = torch.cat([sorted_values[1:], sorted_values[-1:] * 1.0001 + 1e-9])
    cuts = upper > sorted_values
    cut = (sorted_values + upper) / 2
    ok = (rate[None, :] <= levels[:, None] + 1e-12) & cuts[None, :]
    last = torch.where(ok, torch.arange(count)[None, :], -1).max(1).values
    return torch.where(last >= 0, cut[last.clamp(min=0)], torch.zeros_like(levels))


def per_layer_path(path_record: ExitRecord, policy: Entropy, *, steps: int = 400) -> list[Entropy]:
    """The per-layer path of ``policy``'s family set on ``path_record``: never exiting early first, then
    one candidate per level of a fixed grid (quadratic in ``[0, MAX_LEVEL]``), duplicates dropped."""
    values, wrong = _entropies(path_record, policy.normalized), _disagrees(path_record)
    levels = torch.tensor([MAX_LEVEL * (i / steps) ** 2 for i in range(steps + 1)], dtype=torch.float64)
    per_layer = torch.stack([_thresholds_at(values[k], wrong[k], levels) for k in range(values.shape[0])], 1)
    # a later level never lowers a threshold (more rows allowed per exit); keep it so against float noise
    per_layer = torch.cummax(per_layer, 0).values
    num_layers = path_record.num_layers
    candidates, seen = [Entropy((0.0,) * num_layers, normalized=policy.normalized)], set()
    seen.add((0.0,) * (num_layers - 1))
    for row in per_layer.tolist():
        key = tuple(float(v) for v in row)
        if key not in seen:
            seen.add(key)
            candidates.append(Entropy((*key, 0.0), normalized=policy.normalized))
    return candidates


def _fewest_layers_within(candidates, record: ExitRecord, budget: float, loss_of) -> float | None:
    best = None
    for candidate in candidates:
        out = replay(candidate, record)
        if float(loss_of(out.logits).mean()) <= budget + 1e-12:
            layers = out.layers_run.float().mean().item()
            best = layers if best is None else min(best, layers)
    return best


def choose_path(
    path_record: ExitRecord,
    global_candidates: list[ExitPolicy],
    budget: float,
    loss_of,
    *,
    seed: int = 0,
    steps: int = 400,
) -> PathChoice:
    """The path to certify along, chosen on ``path_record`` (rows apart from the calibration rows).

    ``loss_of(logits [N, C], record) -> [N]``: each row's loss under the certified risk; ``budget``:
    a fraction. Both paths are scored on a random half of the path rows, the per-layer one built on
    the other half."""
    policy = global_candidates[0]
    rows = path_record.all_logits.shape[1]
    if not supports_paths(policy) or rows < max(20, per_layer_rows_needed(budget)):
        return PathChoice("global", list(global_candidates), {}, rows)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    build, score = path_record.subset(order[: rows // 2]), path_record.subset(order[rows // 2 :])
    layers = {
        "global": _fewest_layers_within(global_candidates, score, budget, lambda z: loss_of(z, score)),
        "per_layer": _fewest_layers_within(per_layer_path(build, policy), score, budget, lambda z: loss_of(z, score)),
    }
    full = float(path_record.num_layers)
    gain = (layers["global"] or full) - (layers["per_layer"] or full)
    if gain >= MIN_GAIN:
        return PathChoice("per_layer", per_layer_path(path_record, policy, steps=steps), layers, rows)
    return PathChoice("global", list(global_candidates), layers, rows)
