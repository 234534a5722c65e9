"""The candidates calibration scores, each family's in order: from the recorded logits, on a fixed grid, or along a path.

- :func:`candidates`: the uncertified search's, over the quantiles of the recorded heads' values
  (entropy, top probability, the halting CDF, a multi-label margin) or the family's integer knob;
- :func:`certified_candidates`: the certificate's fixed grid, from the most conservative candidate
  (never exits early) to the most aggressive, set by the number of layers and labels only, never by
  the rows (:data:`GRID_STEPS` points on continuous knobs);
- :func:`rerank_candidates` and :func:`certified_rerank_candidates`: ``ScoreBand(low)`` for a reranker,
  over the scores' quantiles or on the fixed grid :data:`CERTIFIED_LOWS`;
- the paths certified calibration walks, below: ordered candidates chosen on rows apart from the
  calibration rows;
- how the candidates are shown, at the end: :func:`describe` (a policy as the code that builds it),
  :func:`print_curve` / :func:`compact_curve` (the accuracy-vs-layers table) and :func:`plot_curve`::

      print_curve(result.curve); plot_curve(result.curve, "curve.png", full_accuracy=result.full_accuracy)

**The paths.** Certified calibration (:mod:`~earlyexit_kernels.calibration.certify`) tests an
ordered family of candidates from the most conservative to the most aggressive and keeps the
last one it certifies. Its guarantee holds for any order fixed before the calibration rows are
read. Two paths of the ``Entropy`` family:

- ``"global"``: one entropy threshold for every layer, on a fixed grid (data-free);
- ``"per_layer"``: one threshold per layer, each set on the *path rows* so that the rows a
  layer's head lets go disagree with the final classifier at most as often as a common level
  ``lam``; the candidates are ``lam`` on a fixed grid, after a ramp from never exiting up to the
  first level's thresholds (scaled). Early heads that are confident and wrong get a lower threshold
  than later heads whose confident answers hold.
- ``"marginal"``: one threshold per layer too, set where the *last* row a layer lets go disagrees with
  probability ``p``, a common level on a fixed grid: each layer's chance of disagreeing given its head's
  entropy, ``sigmoid(a_k * entropy + b_k)``, is fitted on the path rows (logistic regression, two
  numbers a layer). The per-layer path equalizes the disagreement rate of all the rows a layer lets go;
  this one equalizes the risk of the next row each layer would let go, the allocation that spends a
  risk budget on the rows that cost least of it, wherever they are (a learned exit score over the
  entropy, issue 108; ``benchmarks/quality/learned_exit_score_study.py``). On MiniLM-L6 Rotten Tomatoes
  at 1 point, 95%, ``eek fit`` took it and certified 2.49 of 6 layers on the test split, where the per-layer
  path had certified 2.78 (``benchmarks/results/amd_epyc/certified_exits_real_marginal_cpu.json``).

:func:`choose_path` builds the per-layer and the marginal paths on half of the path rows, scores the three
paths on the other half, and averages over both ways of :data:`PATH_SPLITS` random splits (the mean layers each
path's walk would keep certified on as many calibration rows like those: the walk stops at the first candidate
the rows fail, so a path that jumps early from never exiting to exiting many rows keeps nothing past the jump)
and keeps the per-layer or marginal path, the one that needs fewer, only where it saves at least
:data:`MIN_GAIN` layers over the global one (the simplest path otherwise), rebuilt on every path row. The path rows are the validation rows (early stopping,
the head choice), never the calibration rows: the path is fixed before the test, so the
certificate stays exact. The per-layer path is tried only where the path rows can resolve the
budget (:func:`per_layer_rows_needed`): on fewer, its first candidate after "never exit" admits
every row before the first error of a few dozen, which other rows then break, and the certificate
stops there (measured: 150 validation rows at 1% chose it, and certified nothing).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.predicted_walk import WalkTable, point_weights
from earlyexit_kernels.calibration.record import CurvePoint, ExitRecord, replays
from earlyexit_kernels.calibration.row_losses import disagreement
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.methods.policies import (
    DACT,
    Entropy,
    ExitPolicy,
    MaxProb,
    MultiLabelConfidence,
    Patience,
    QExit,
    ScoreBand,
    SkipGates,
    Voting,
)

__all__ = [
    "compact_curve",
    "describe",
    "distinct_digits",
    "plot_curve",
    "print_curve",
    "CERTIFIED_LOWS",
    "GRID_STEPS",
    "candidates",
    "certified_candidates",
    "certified_rerank_candidates",
    "rerank_candidates",
    "PATHS",
    "MIN_GAIN",
    "PATH_SPLITS",
    "BUILD_ROWS_PER_BUDGET",
    "PathChoice",
    "per_layer_path",
    "marginal_path",
    "per_layer_rows_needed",
    "choose_path",
    "supports_paths",
]

#: points of the fixed threshold grids (continuous knobs); finer near the conservative end
GRID_STEPS = 400
#: the fixed grid of ``ScoreBand(low)`` certified calibration tests, most conservative first:
#: never early, then raw scores from -20 to 20 in steps of 0.05
CERTIFIED_LOWS = (-1e9, *(round(-20.0 + 0.05 * i, 2) for i in range(801)))

#: the paths, simplest first
PATHS = ("global", "per_layer", "marginal")
#: the mean layers the per-layer path must save on the held-out path rows to be preferred
MIN_GAIN = 0.05
#: the random splits of the path rows in halves :func:`choose_path` scores the paths on, each both ways: one
#: half's score moves with the split; the mean over 4 splits about half as much. On the RT pool's re-draws it saved
#: 0.035 +- 0.015 layers (disagreement) and 0.041 +- 0.021 (accuracy lost) more than one split's half, paired by
#: draw (``benchmarks/results/amd_epyc/certified_paths_redraw_splits_cpu.json``)
PATH_SPLITS = 4
#: the largest per-exit disagreement level of the per-layer grid (past it every head lets every row go)
MAX_LEVEL = 0.5
#: the rows the per-layer thresholds are set on, in units of 1 / budget: three errors expected at the budget
BUILD_ROWS_PER_BUDGET = 3
#: the steps of the per-layer path's ramp: from never exiting to its first level's thresholds, scaled
RAMP_STEPS = 100


def _quantile_grid(values: torch.Tensor, count: int) -> list[float]:
    values = values[torch.isfinite(values)].float()
    if values.numel() == 0:
        return []
    if values.numel() > 1_000_000:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    grid = torch.quantile(values.double(), torch.linspace(0, 1, count, dtype=torch.float64))
    return sorted({float(v) for v in grid})


def candidates(record: ExitRecord, policy: ExitPolicy | None = None, *, count: int = 60) -> list[ExitPolicy]:
    """The candidate policies of ``policy``'s family (default: the recorded policy's) for this record: for a
    threshold, about ``count`` values at quantiles of what the rule compares on the internal heads
    (``all_logits[:-1]`` [L - 1, N, C], QExit's ``all_halting_logits[:-1]`` [L - 1, N]); every patience or
    vote count for Patience and Voting."""
    policy = record.policy if policy is None else policy
    num_layers = record.num_layers
    inner = record.all_logits[:-1].float()  # the internal heads decide the early exits
    if isinstance(policy, (Entropy, SkipGates)):
        h = entropy(inner)
        if policy.normalized:
            h = h / math.log(record.all_logits.shape[-1])
        # Exit when H < tau: tau = 0 never exits early, a tau above every entropy exits at once.
        thresholds = [0.0] + [v for v in _quantile_grid(h, count) if v > 0] + [float(h.max()) * 1.001 + 1e-6]
        if isinstance(policy, SkipGates):
            return [dataclasses.replace(policy, entropy_threshold=t) for t in thresholds]
        return [Entropy(t, normalized=policy.normalized) for t in thresholds]
    if isinstance(policy, MaxProb):
        probs = torch.softmax(inner, dim=-1).amax(-1)
        return [MaxProb(t, temperature=policy.temperature) for t in _quantile_grid(probs, count) + [1.0]]
    if isinstance(policy, Patience):
        return [Patience(p, regression_threshold=policy.regression_threshold) for p in range(1, num_layers)]
    if isinstance(policy, Voting):
        return [Voting(k) for k in range(1, num_layers + 1)]
    if isinstance(policy, QExit):
        lam = torch.sigmoid(record.all_halting_logits[:-1].float())
        cdf = 1.0 - torch.cumprod(1.0 - lam, dim=0)
        qs = [min(max(v, 1e-6), 1 - 1e-6) for v in _quantile_grid(cdf, count)] + [1 - 1e-6]
        return [dataclasses.replace(policy, q=q, stochastic=False) for q in sorted(set(qs))]
    if isinstance(policy, DACT):
        return [DACT()]
    if isinstance(policy, MultiLabelConfidence):
        # A row exits when its least decided label has |z| >= ln(t / (1 - t)): the grid is over that |z|.
        least = inner.abs().amin(-1)
        margins = [m for m in _quantile_grid(least, count) if m > 0]
        thresholds = [0.5] + [1.0 / (1.0 + math.exp(-m)) for m in margins] + [1.0]
        return [MultiLabelConfidence(t) for t in sorted(set(thresholds))]
    raise ValueError(f"cannot calibrate a {type(policy).__name__} policy")


def _entropy_grid(maximum: float, steps: int) -> list[float]:
    # Exit when H < tau: tau = 0 never exits early; quadratic spacing resolves the confident end.
    return [maximum * 1.0001 * (i / steps) ** 2 for i in range(steps + 1)]


def certified_candidates(
    policy: ExitPolicy, num_layers: int, num_labels: int, *, steps: int = GRID_STEPS
) -> list[ExitPolicy]:
    """The fixed grid of ``policy``'s family, from the most conservative candidate to the most aggressive.

    It depends on ``num_layers`` and ``num_labels`` only, never on data: that is what lets
    the fixed-sequence test certify the one it stops at. The first candidate never exits
    early (for ``QExit`` and ``MaxProb``: only on saturated heads).
    """
    if isinstance(policy, (Entropy, SkipGates)):
        maximum = 1.0 if policy.normalized else math.log(num_labels)
        grid = _entropy_grid(maximum, steps)
        if isinstance(policy, SkipGates):
            return [dataclasses.replace(policy, entropy_threshold=t) for t in grid]
        return [Entropy(t, normalized=policy.normalized) for t in grid]
    if isinstance(policy, MaxProb):
        floor = 1.0 / num_labels
        return [
            MaxProb(1.0 - (1.0 - floor) * (i / steps) ** 2, temperature=policy.temperature) for i in range(steps + 1)
        ]
    if isinstance(policy, Patience):
        return [Patience(p, regression_threshold=policy.regression_threshold) for p in range(num_layers - 1, 0, -1)]
    if isinstance(policy, Voting):
        return [Voting(k) for k in range(num_layers, 0, -1)]
    if isinstance(policy, QExit):
        qs = [min(1.0 - 1e-7, max(1e-7, 1.0 - (i / steps) ** 2)) for i in range(steps + 1)]
        return [dataclasses.replace(policy, q=q, stochastic=False) for q in dict.fromkeys(qs)]
    if isinstance(policy, MultiLabelConfidence):
        return [MultiLabelConfidence(1.0 - 0.5 * (i / steps) ** 2) for i in range(steps + 1)]
    if isinstance(policy, DACT):
        return [DACT()]
    raise ValueError(f"cannot calibrate a {type(policy).__name__} policy")


def rerank_candidates(record: ExitRecord, policy: ScoreBand | None = None, *, count: int = 60) -> list[ScoreBand]:
    """``ScoreBand(low=t)`` (with ``policy.high``) for ``t`` over the internal heads' score quantiles."""
    high = policy.high if policy is not None else None
    inner = record.all_logits[:-1, :, 0].float().reshape(-1)
    inner = inner[torch.isfinite(inner)]
    if inner.numel() == 0:
        raise ValueError("the record has no finite scores from the internal heads (a one-layer model?)")
    grid = torch.quantile(inner.double(), torch.linspace(0, 1, count, dtype=torch.float64)).tolist()
    never = float(inner.min()) - 1.0
    lows = sorted({never, *grid})
    if high is not None:
        lows = [t for t in lows if t < high]
    return [ScoreBand(low=t, high=high) for t in lows]


def certified_rerank_candidates(policy: ScoreBand | None = None) -> list[ScoreBand]:
    """``ScoreBand(low)`` on the fixed grid :data:`CERTIFIED_LOWS` (keeping ``policy.high``), most conservative first."""
    high = policy.high if policy is not None else None
    return [ScoreBand(low=t, high=high) for t in CERTIFIED_LOWS if high is None or t < high]


def per_layer_rows_needed(budget: float) -> int:
    """The fewest path rows for which :func:`choose_path` tries the per-layer path at ``budget`` (a fraction):
    half of them set its thresholds, and must expect :data:`BUILD_ROWS_PER_BUDGET` errors at the budget."""
    return 2 * math.ceil(BUILD_ROWS_PER_BUDGET / max(budget, 1e-9) - 1e-9)


@dataclass
class PathChoice:
    """The path kept (``name``), its candidates in order, and each path's score on the held-out halves of the
    path rows (``layers``: path name -> the mean over the folds of the mean layers its certificate would keep
    there, or, where the calibration rows were not given, of the fewest of any candidate within the budget, a
    fold without one counting every layer; None where no fold had one)."""

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
    """[L - 1, N] bool: each internal head disagrees with the final classifier (:func:`~.losses.disagreement`:
    its class differs)."""
    full = record.full_logits
    return torch.stack([disagreement(logits, full) > 0 for logits in record.all_logits[:-1]])


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
    """The per-layer path of ``policy``'s family set on ``path_record``: never exiting early first, then a
    ramp of ``RAMP_STEPS`` candidates up to the first level's thresholds (those thresholds scaled by a fixed
    grid of factors), then one candidate per level of a fixed grid (quadratic in ``[0, MAX_LEVEL]``),
    duplicates dropped.

    The ramp is there because the first level already lets go every row a head is as sure of as the
    surest one it got wrong on the path rows: with no error among them there, it can exit half the rows
    at once. Calibration rows that find a few errors among them fail that step, and the walk would stop
    at never exiting; along the ramp it stops where they start to fail."""
    values, wrong = _entropies(path_record, policy.normalized), _disagrees(path_record)
    levels = torch.tensor([MAX_LEVEL * (i / steps) ** 2 for i in range(steps + 1)], dtype=torch.float64)
    per_layer = torch.stack([_thresholds_at(values[k], wrong[k], levels) for k in range(values.shape[0])], 1)
    # a later level never lowers a threshold (more rows allowed per exit); keep it so against float noise
    per_layer = torch.cummax(per_layer, 0).values
    factors = torch.tensor([(i / RAMP_STEPS) ** 2 for i in range(1, RAMP_STEPS)], dtype=per_layer.dtype)
    per_layer = torch.cat([factors[:, None] * per_layer[:1], per_layer])
    return _path_of(per_layer, policy.normalized)


def _path_of(per_layer: torch.Tensor, normalized: bool) -> list[Entropy]:
    """The candidates of a path whose internal layers' thresholds are the rows of ``per_layer`` [steps, L - 1], in
    order: never exiting early first, each row then once (the last layer always exits)."""
    num_layers = per_layer.shape[1] + 1
    candidates, seen = [Entropy((0.0,) * num_layers, normalized=normalized)], {(0.0,) * (num_layers - 1)}
    for row in per_layer.tolist():
        key = tuple(float(v) for v in row)
        if key not in seen:
            seen.add(key)
            candidates.append(Entropy((*key, 0.0), normalized=normalized))
    return candidates


#: the L2 penalty of each layer's logistic fit (entropy, intercept): keeps it finite where the path rows separate
_MARGINAL_L2 = 1e-3


def _disagreement_odds(values: torch.Tensor, wrong: torch.Tensor) -> tuple[float, float] | None:
    """``(a, b)``: the logistic regression ``P(disagrees) = sigmoid(a * entropy + b)`` of one layer on the path
    rows (Newton's method, a small L2 penalty); None where the chance does not grow with the entropy
    (``a <= 0``), which no threshold on the entropy can use."""
    x = torch.stack([values, torch.ones_like(values)], 1)
    weights = torch.zeros(2, dtype=torch.float64)
    penalty = _MARGINAL_L2 * torch.eye(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(x @ weights)
        gradient = x.T @ (p - wrong) + _MARGINAL_L2 * weights
        step = torch.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + penalty, gradient)
        weights = weights - step
        if float(step.abs().max()) < 1e-10:
            break
    a, b = (float(w) for w in weights)
    return (a, b) if a > 0 and math.isfinite(a) and math.isfinite(b) else None


def marginal_path(path_record: ExitRecord, policy: Entropy, *, steps: int = 400) -> list[Entropy]:
    """The marginal path of ``policy``'s family set on ``path_record``: never exiting early first, then one
    candidate per level ``p`` of a fixed grid (quadratic in ``(0, MAX_LEVEL]``), each layer's threshold the
    entropy at which its fitted chance of disagreeing with the final classifier reaches ``p``
    (:func:`_disagreement_odds`); duplicates dropped. A layer whose chance does not grow with the entropy
    takes its rows' smoothed disagreement rate, ``(wrong + 1/2) / (rows + 1)``, for every row: nothing exits
    there below that level, everything above it."""
    values, wrong = _entropies(path_record, policy.normalized), _disagrees(path_record).double()
    most = (1.0 if policy.normalized else math.log(path_record.all_logits.shape[-1])) * (1 + 1e-6)
    levels = torch.tensor([MAX_LEVEL * (i / steps) ** 2 for i in range(1, steps + 1)], dtype=torch.float64)
    columns = []
    for k in range(values.shape[0]):
        odds = _disagreement_odds(values[k], wrong[k])
        if odds is None:
            rate = (float(wrong[k].sum()) + 0.5) / (wrong.shape[1] + 1)
            columns.append(torch.where(levels >= rate, most, 0.0))
        else:
            a, b = odds
            columns.append(((torch.logit(levels) - b) / a).clamp(0.0, most))
    per_layer = torch.cummax(torch.stack(columns, 1), 0).values  # a later level never lowers a threshold
    return _path_of(per_layer, policy.normalized)


_PATH_BUILDERS = {"per_layer": per_layer_path, "marginal": marginal_path}


def _fewest_layers_within(candidates, record: ExitRecord, budget: float, loss_of) -> float | None:
    best = None
    for out in replays(candidates, record):
        if float(loss_of(out.logits).mean()) <= budget + 1e-12:
            layers = out.layers_run.float().mean().item()
            best = layers if best is None else min(best, layers)
    return best


def _path_score(path, score: ExitRecord, budget: float, loss_of, confidence, calibration_rows) -> float | None:
    """``path`` scored on ``score``'s rows: see :func:`choose_path`."""
    if confidence is not None and calibration_rows is not None:
        table = WalkTable.of_path(path, score, lambda z: loss_of(z, score))
        return float(table.predicted(point_weights(score.all_logits.shape[1]), budget, confidence, calibration_rows)[0])
    return _fewest_layers_within(path, score, budget, lambda z: loss_of(z, score))


def choose_path(
    path_record: ExitRecord,
    global_candidates: list[ExitPolicy],
    budget: float,
    loss_of,
    *,
    seed: int = 0,
    steps: int = 400,
    confidence: float | None = None,
    calibration_rows: int | None = None,
    splits: int = PATH_SPLITS,
) -> PathChoice:
    """The path to certify along, chosen on ``path_record`` (rows apart from the calibration rows).

    ``loss_of(logits [N, C], record) -> [N]``: each row's loss under the certified risk; ``budget``:
    a fraction. The path rows are split in random halves ``splits`` times (:data:`PATH_SPLITS`); on each split
    the per-layer and marginal paths are built on one half and every path is scored on the other, then the
    halves swap, and each path's score is its mean over the ``2 * splits`` folds. Given the certificate's
    ``confidence`` and ``calibration_rows``, each path scores the mean layers its walk would keep certified on
    that many rows like the held-out half's (a path whose early candidate those rows would fail keeps nothing
    past it); without them, the fewest mean layers of any of its candidates within the budget there."""
    policy = global_candidates[0]
    rows = path_record.all_logits.shape[1]
    if not supports_paths(policy) or rows < max(20, per_layer_rows_needed(budget)):
        return PathChoice("global", list(global_candidates), {}, rows)
    predicts = confidence is not None and calibration_rows is not None
    # the global path is the same on every fold: its rows' table made once, each fold weighing its held-out half
    whole = WalkTable.of_path(global_candidates, path_record, lambda z: loss_of(z, path_record)) if predicts else None
    generator = torch.Generator().manual_seed(seed)
    scores = []  # per fold, each path's score on the half it was not built on
    for _ in range(splits):
        order = torch.randperm(rows, generator=generator)
        for build_rows, score_rows in (
            (order[: rows // 2], order[rows // 2 :]),
            (order[rows // 2 :], order[: rows // 2]),
        ):
            build, score = path_record.subset(build_rows), path_record.subset(score_rows)
            fold = {
                name: _path_score(made(build, policy), score, budget, loss_of, confidence, calibration_rows)
                for name, made in _PATH_BUILDERS.items()
            }
            if predicts:
                weights = torch.zeros(1, rows, dtype=torch.float64)
                weights[0, score_rows] = 1.0 / len(score_rows)
                fold["global"] = float(whole.predicted(weights, budget, confidence, calibration_rows)[0])
            else:
                fold["global"] = _path_score(global_candidates, score, budget, loss_of, None, None)
            scores.append(fold)
    # a path without a candidate within the budget on a fold (uncertified scoring) needs every layer there
    full = float(path_record.num_layers)
    layers = {
        name: None
        if all(fold[name] is None for fold in scores)
        else sum(full if fold[name] is None else fold[name] for fold in scores) / len(scores)
        for name in PATHS
    }
    # the fewest layers of the paths that save MIN_GAIN over the global one; ties to the simpler (PATHS' order)
    needed = {name: full if value is None else value for name, value in layers.items()}
    best = min(PATHS[1:], key=lambda name: (needed[name], PATHS.index(name)))
    if needed["global"] - needed[best] >= MIN_GAIN:
        return PathChoice(best, _PATH_BUILDERS[best](path_record, policy, steps=steps), layers, rows)
    return PathChoice("global", list(global_candidates), layers, rows)


def describe(policy: ExitPolicy, digits: int | None = 4) -> str:
    """The code that builds ``policy``, floats rounded to ``digits`` significant digits (None: exact).

    ``Entropy(0.2131)``, ``Patience(2)``, ``QExit(q=0.41)``, ``SkipGates(entropy_threshold=0.3874)``:
    valid Python, as :meth:`ExitPolicy.to_code` writes it.
    """
    return policy.to_code(digits)


def distinct_digits(policies: Sequence[ExitPolicy], start: int = 4) -> int | None:
    """The fewest significant digits (at least ``start``) that print distinct policies distinctly.

    None when only the exact text does (17 digits are always enough for a float).
    """
    exact = len({repr(p) for p in policies})
    for digits in range(start, 18):
        if len({p.to_code(digits) for p in policies}) == exact:
            return digits
    return None


def print_curve(curve: Sequence[CurvePoint], file=None) -> None:
    """Print the accuracy-vs-layers table, cheapest first, with enough digits to tell the policies apart."""
    digits = distinct_digits([p.policy for p in curve])
    names = [describe(p.policy, digits) for p in curve]
    width = max([34, *(len(n) + 2 for n in names)])
    print(f"{'policy':<{width}}{'accuracy':>10}{'layers':>9}{'exit':>7}", file=file)
    for name, point in sorted(zip(names, curve), key=lambda item: (item[1].mean_layers, item[1].accuracy)):
        print(
            f"{name:<{width}}{100 * point.accuracy:>9.2f}%{point.mean_layers:>9.3f}{point.mean_exit_layer:>7.2f}",
            file=file,
        )


def compact_curve(curve: Sequence[CurvePoint], rows: int = 12, chosen: CurvePoint | None = None) -> list[CurvePoint]:
    """At most ``rows`` points of ``curve`` for printing: its Pareto front (no other point is both
    cheaper and more accurate), thinned evenly by mean layers, with its two ends and ``chosen`` kept."""
    ordered = sorted(curve, key=lambda p: (p.mean_layers, -p.accuracy))
    front, best = [], -math.inf
    for point in ordered:
        if point.accuracy > best:
            front.append(point)
            best = point.accuracy
    if len(front) > rows:
        picks = {round(i * (len(front) - 1) / (rows - 1)) for i in range(rows)}
        front = [p for i, p in enumerate(front) if i in picks]
    if chosen is not None and all(p is not chosen for p in front):
        front.append(chosen)
    return sorted(front, key=lambda p: (p.mean_layers, p.accuracy))


def plot_curve(
    curves,
    path: str,
    *,
    full_accuracy: float | None = None,
    baseline: Sequence[tuple[int, float]] | None = None,
    chosen: CurvePoint | None = None,
    title: str = "accuracy vs mean layers run",
) -> str | None:
    """Save accuracy against mean layers run as an image; returns ``path``, or None without matplotlib.

    ``curves``: one curve (a list of :class:`CurvePoint`) or a dict ``{label: curve}``.
    ``baseline``: the static cut-at-layer-k accuracies, drawn dashed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plot_curve: matplotlib is not installed (pip install matplotlib); no plot written", stacklevel=2)
        return None
    if not isinstance(curves, Mapping):
        curves = {"early exit": curves}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if baseline is not None:
        ax.plot([k for k, _ in baseline], [100 * a for _, a in baseline], "k--o", ms=3, label="static: cut at layer k")
    for label, curve in curves.items():
        points = sorted(curve, key=lambda p: p.mean_layers)
        ax.plot([p.mean_layers for p in points], [100 * p.accuracy for p in points], "-o", ms=3, label=label)
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="grey", lw=0.8, label="full model")
    if chosen is not None:
        ax.plot([chosen.mean_layers], [100 * chosen.accuracy], "r*", ms=12, label="chosen")
    ax.set_xlabel("mean layers run")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
