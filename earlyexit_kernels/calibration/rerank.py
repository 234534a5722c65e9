"""Calibrate ``ScoreBand`` for a cross-encoder reranker so the top of each ranking stays the full model's.

The candidates of one query are scored as ``(query, passage)`` rows; a row may leave early
when its score is already low (``ScoreBand(low)``). What matters is the head of the
ranking: the measure is the **recall of the full model's top k**, per query the fraction
of the full model's ``k`` best candidates that are still among the ``k`` best under early
exit, averaged over the queries (``k = min(k, candidates)``). No labels are needed.

    record = record_exits(model, batches)        # rows of every query's pairs (training.record_exits)
    result = calibrate_rerank(record, groups, k=10, min_recall=0.99)
    eek.patch(model, result.policy)

``groups`` [N] gives each row's query (any integers; rows of one query need not be
adjacent). The candidates are ``ScoreBand(low=t)`` for ``t`` over the quantiles of the
internal heads' scores (keeping the ``high`` of ``policy`` when it has one), plus a ``low``
below every score (never early). Each is replayed with
:func:`earlyexit_kernels.calibration.record.replay`: the decisions of the patched model.

With ``confidence=`` the recall is certified instead: the queries are the exchangeable units,
each query's loss is ``1 - recall`` of the full model's top k (in [0, 1]), and the candidates
are a fixed grid of ``low`` (:data:`~earlyexit_kernels.calibration.candidates.CERTIFIED_LOWS`, never from the data) tested from the most
conservative up with the Hoeffding-Bentkus bound, stopping at the first not certified
(:mod:`earlyexit_kernels.calibration.certify`). With probability ``confidence``
over the draw of the calibration queries, the mean recall on queries like them is at least
``min_recall``; ``result.certificate`` says the bound reached.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.candidates import certified_rerank_candidates, rerank_candidates
from earlyexit_kernels.calibration.certify import Certificate, certified_index, require_rows
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import missed_top_k, top_k_recall
from earlyexit_kernels.calibration.select import select_point
from earlyexit_kernels.methods.policies import ScoreBand
from earlyexit_kernels.methods.risk_control import check_confidence, risk_upper_bound, test_for

__all__ = [
    "RerankPoint",
    "RerankCalibration",
    "ndcg_at",
    "calibrate_rerank",
]


@dataclass
class RerankPoint:
    """One candidate policy: recall of the full model's top k (a fraction) and mean layers run."""

    policy: ScoreBand
    recall: float
    mean_layers: float


@dataclass
class RerankCalibration:
    """The chosen policy, its recall and mean layers, whether the target was met, the target and the curve."""

    policy: ScoreBand
    recall: float
    mean_layers: float
    met: bool
    target: str
    curve: list[RerankPoint]
    certificate: object | None = None


def _group_rows(groups: torch.Tensor) -> list[torch.Tensor]:
    groups = torch.as_tensor(groups).reshape(-1)
    return [(groups == g).nonzero().squeeze(-1) for g in torch.unique(groups)]


def _top(values: torch.Tensor, size: int) -> list[int]:
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return order[:size]


def calibrate_rerank(
    record: ExitRecord,
    groups: torch.Tensor,
    *,
    k: int = 10,
    min_recall: float | None = None,
    target_layers: float | None = None,
    policy: ScoreBand | None = None,
    count: int = 60,
    confidence: float | None = None,
) -> RerankCalibration:
    """Choose ``ScoreBand(low)`` on a record of (query, passage) rows for one target.

    Shapes: ``record.all_logits`` [L, N, 1] (one score per row and layer), ``groups`` [N] (each row's query).

    ``min_recall`` (a fraction): the fewest mean layers run whose recall of the full
    model's top ``k`` is at least it; ``target_layers``: the best recall with at most that
    many mean layers. Ties go to the higher recall, then the cheaper. When nothing meets
    the target, the closest candidate comes back with ``met=False`` and a warning.
    ``confidence`` (with ``min_recall``): certify it over the draw of the queries (see the
    module's docstring); ``met`` is then whether any early exit was certified.
    """
    if (min_recall is None) == (target_layers is None):
        raise ValueError("give exactly one target: min_recall (a fraction) or target_layers (mean layers)")
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be a fraction in [0, 1], got {min_recall!r}")
    if record.all_logits.shape[-1] != 1:
        raise ValueError(
            f"calibrate_rerank is for one-output cross-encoders (num_labels == 1); the record has "
            f"{record.all_logits.shape[-1]} outputs: use earlyexit_kernels.training.calibrate_model.calibrate"
        )
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.numel() != record.all_logits.shape[1]:
        raise ValueError(f"groups has {groups.numel()} entries for {record.all_logits.shape[1]} rows; give one per row")
    full = record.all_logits[-1, :, 0].float()
    if confidence is not None:
        if min_recall is None:
            raise ValueError("confidence certifies a recall: give min_recall, not target_layers")
        return _certified_rerank(record, groups, full, k, min_recall, confidence, policy)
    curve = []
    for candidate in rerank_candidates(record, policy, count=count):
        result = replay(candidate, record)
        recall = top_k_recall(result.logits[:, 0], full, groups, k)
        curve.append(RerankPoint(candidate, recall, result.layers_run.float().mean().item()))
    if min_recall is not None:
        target = f"recall of the full model's top {k} >= {min_recall:g}"
        best, feasible = select_point(curve, lambda p: p.recall, floor=min_recall - 1e-12)
    else:
        target = f"mean layers <= {target_layers:g}"
        best, feasible = select_point(curve, lambda p: p.recall, max_layers=target_layers)
    if not feasible:
        warnings.warn(f"calibrate_rerank: no candidate meets {target}; returning the closest", stacklevel=2)
    return RerankCalibration(best.policy, best.recall, best.mean_layers, bool(feasible), target, curve)


def _certified_rerank(record, groups, full, k, min_recall, confidence, policy) -> RerankCalibration:
    confidence = check_confidence(confidence)
    budget = 1.0 - min_recall
    queries = len(_group_rows(groups))
    require_rows(queries, budget, confidence, unit="queries", hint=", a lower min_recall")
    grid = certified_rerank_candidates(policy)
    points, losses = {}, {}

    def losses_of(index: int) -> torch.Tensor:
        result = replay(grid[index], record)
        losses[index] = missed_top_k(result.logits[:, 0], full, groups, k)
        points[index] = RerankPoint(
            grid[index], 1.0 - float(losses[index].mean()), result.layers_run.float().mean().item()
        )
        return losses[index]

    # a query's loss is the share of the full model's top k missed: whole (0/1) at k = 1 only
    test = test_for(paired=False, fractional=k > 1)
    last = certified_index(losses_of, len(grid), budget, confidence, test=test)
    chosen = points[max(last, 0)]
    num_layers = record.num_layers
    certified = last >= 0 and chosen.mean_layers < num_layers - 1e-9
    loss = losses[max(last, 0)]
    certificate = Certificate(
        budget=budget,
        confidence=confidence,
        risk=f"the full model's top {k} missed (fraction per query)",
        rows=queries,
        observed=float(loss.mean()),
        bound=risk_upper_bound(loss, confidence, test=test),
        certified=certified,
        tested=len(points),
        mean_layers=chosen.mean_layers,
        num_layers=num_layers,
        unit="queries",
    )
    target = f"recall of the full model's top {k} >= {min_recall:g} with confidence {100 * confidence:g}%"
    if not certified:
        warnings.warn(f"calibrate_rerank: {certificate.describe()}", stacklevel=3)
    curve = [points[i] for i in sorted(points)]
    return RerankCalibration(chosen.policy, chosen.recall, chosen.mean_layers, certified, target, curve, certificate)


def ndcg_at(scores: torch.Tensor, relevance: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of nDCG@k of the ranking by ``scores`` [N] against graded ``relevance`` [N]."""
    values = []
    for rows in _group_rows(groups):
        gains = relevance[rows].float()
        order = _top(scores[rows], min(k, rows.numel()))
        ideal = sorted(gains.tolist(), reverse=True)[: len(order)]
        dcg = sum((2 ** float(gains[i]) - 1) / math.log2(r + 2) for r, i in enumerate(order))
        best = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
        values.append(dcg / best if best > 0 else 1.0)
    return sum(values) / len(values)
