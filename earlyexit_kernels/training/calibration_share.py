"""How many training rows ``eek fit`` keeps out to certify on, chosen on the rows themselves.

The exit heads need far fewer rows than the bound does: a head reads one layer's vector and
converges on a few thousand rows at most, while certifying a loss under one point at 95% wants
thousands of rows (1% at 95% on 343 rows allows no error at all). A fixed quarter of the file
starves the bound on a large file and can starve the heads on a small one. So the share is
measured: the heads (the method's heads-only stage, on a copy of the model) are trained on
growing prefixes of a random order of the training rows, ``FIRST_PROBE_ROWS`` then twice as
many each time, and each time the layers they would keep certified are *predicted* on the
validation rows: along the policy's global grid, the last candidate (in the certified order)
that the rows left to certify would certify were they like the validation rows (the exact
binomial for 0/1 losses; the observed paired loss plus ``z`` standard errors, ``z`` the normal
quantile of the confidence).

After each doubling the probe weighs both sides of the next one (:func:`doubling_verdict`): what
the last doubling saved, the heads compared at the same calibration rows, against what the next
doubling's fewer calibration rows would cost the current heads. It stops only when that net gain
is below ``MIN_GAIN_LAYERS`` with ``STOP_CONFIDENCE`` over bootstrap re-draws of the validation
rows (the same re-draws weigh both heads: paired). A greedy stop on the point difference stopped
on noise: an outside check's 256 and 512 rows predicted 3.88 and 3.92 layers on 1,031 validation
rows, the probe kept 512 rows to train the heads, and the fit ran 4.10 of 6 layers on unseen rows
where training on three quarters ran 3.56. Heads rarely get worse with more rows, so a flat or
noisy difference goes on; the price of fewer calibration rows, which grows fast once they are few,
is what stops it. The re-draws measure the validation rows' noise, not the training's. The rows
the probe reached train the heads, every later row of the order certifies; the probe reads only
rows that end up training and the validation rows, never a calibration row, so the certificate
stays exact (which is why it never goes back to a smaller size).

Where there is nothing to probe (a recipe that trains the backbone too, too few rows for two
sizes), the fixed ``CALIBRATION_FRACTION`` applies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "FIRST_PROBE_ROWS",
    "MIN_GAIN_LAYERS",
    "STOP_CONFIDENCE",
    "CandidateTable",
    "DoublingVerdict",
    "ShareChoice",
    "choose_share",
    "doubling_verdict",
    "encoded_subset",
    "predicted_layers",
    "redraws",
]

#: the first prefix the probe trains the heads on; each next one is twice as long
FIRST_PROBE_ROWS = 256
#: the mean layers a doubling of the training rows must be predicted to save for the probe to go on
MIN_GAIN_LAYERS = 0.05
#: the probe stops once the net gain of a doubling is below ``MIN_GAIN_LAYERS`` with this confidence
STOP_CONFIDENCE = 0.9
#: bootstrap re-draws of the validation rows that measure that confidence
REDRAWS = 400


@dataclass
class ShareChoice:
    """The split: ``train`` and ``calibration`` (row indices of the training rows, disjoint), how it was
    chosen (``probe``: ``(rows, score)`` per prefix tried; ``reason``)."""

    train: list[int]
    calibration: list[int]
    reason: str
    probe: list[tuple[int, float]] = field(default_factory=list)

    def describe(self) -> str:
        if not self.probe:
            return f"calibration share: {self.reason}"
        tried = ", ".join(f"{rows} rows {layers:.2f}" for rows, layers in self.probe)
        return (
            f"calibration share chosen on the rows: mean layers the heads would keep certified (predicted on the "
            f"validation rows) after training on {tried}; {self.reason}: {len(self.train)} rows train the heads, "
            f"{len(self.calibration)} certify"
        )


def predicted_layers(record, policy, budget: float, confidence: float, calibration_rows: int, target: str) -> float:
    """The mean layers certification on ``calibration_rows`` rows like ``record``'s would keep: along the global
    grid of ``policy``'s family, the last candidate (most conservative first) that rows like ``record``'s would
    certify: 0/1 losses by the exact binomial, paired ones when their mean plus ``z`` standard errors at
    ``calibration_rows`` rows is within ``budget`` (``z``: the normal quantile of ``confidence``); all the
    layers where none is (and below the rows a loss-free policy needs)."""
    table = CandidateTable.of(record, policy, target)
    return float(table.predicted(_point(table.rows), budget, confidence, calibration_rows)[0])


@dataclass
class CandidateTable:
    """Each candidate of the certified grid (most conservative first) on the rows of one record: the rows'
    ``losses`` and ``layers`` [candidates, rows], so that :meth:`predicted` weighs them for many re-draws
    of the rows at once."""

    losses: torch.Tensor  # float64
    layers: torch.Tensor  # float64
    binary: bool
    num_layers: int

    @property
    def rows(self) -> int:
        return self.losses.shape[1]

    @classmethod
    def of(cls, record, policy, target: str) -> CandidateTable:
        from earlyexit_kernels.calibration.candidates import certified_candidates
        from earlyexit_kernels.calibration.losses import row_losses
        from earlyexit_kernels.calibration.record import replay
        from earlyexit_kernels.methods.risk_control import is_binary

        num_layers, _, num_labels = record.all_logits.shape
        losses, layers = [], []
        for candidate in certified_candidates(policy, num_layers, num_labels):
            out = replay(candidate, record)
            losses.append(row_losses(out.logits, record, target))
            layers.append(out.layers_run.double())
        stacked = torch.stack(losses)
        return cls(stacked, torch.stack(layers), is_binary(stacked), num_layers)

    def predicted(self, weights: torch.Tensor, budget: float, confidence: float, calibration_rows: int):
        """:func:`predicted_layers` for each row of ``weights`` [draws, rows] (each draw's weights sum to 1):
        float64 [draws]."""
        from statistics import NormalDist

        from earlyexit_kernels.calibration.certify import least_rows, most_losses

        draws = weights.shape[0]
        full = torch.full((draws,), float(self.num_layers), dtype=torch.float64)
        if calibration_rows < least_rows(budget, confidence):
            return full
        rate = weights @ self.losses.T  # [draws, candidates]
        if self.binary:  # the exact binomial, as certification counts 0/1 losses
            fails = torch.floor(rate * calibration_rows + 1e-9) > most_losses(calibration_rows, budget, confidence)
        else:
            spread = (weights @ (self.losses**2).T - rate**2).clamp_min(0.0).sqrt()
            z = NormalDist().inv_cdf(confidence)
            fails = rate + z * spread / math.sqrt(calibration_rows) > budget
        # the walk stops at its first failing candidate; the one before it is certified
        sentinel = torch.ones((draws, 1), dtype=torch.bool)
        first_fail = torch.cat([fails, sentinel], dim=1).int().argmax(dim=1)
        mean_layers = torch.cat([full[:, None], weights @ self.layers.T], dim=1)
        return mean_layers.gather(1, first_fail[:, None]).squeeze(1)


def _point(rows: int) -> torch.Tensor:
    return torch.full((1, rows), 1.0 / rows, dtype=torch.float64)


def redraws(rows: int, draws: int, seed: int) -> torch.Tensor:
    """Weights [1 + draws, rows]: the rows as they are, then ``draws`` bootstrap re-draws of them (each row's
    count over ``rows``), seeded: the same re-draws weigh every record of the same rows (paired)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(rows, (draws, rows), generator=generator)
    counts = torch.zeros((draws, rows), dtype=torch.float64).scatter_add_(
        1, picks, torch.ones((draws, rows), dtype=torch.float64)
    )
    return torch.cat([_point(rows), counts / rows])


@dataclass
class DoublingVerdict:
    """Whether to double the head-training rows once more, weighed on the validation rows.

    ``gain``: mean layers the last doubling saved, both heads certified on the calibration rows left now;
    ``price``: what the next doubling's fewer calibration rows cost the current heads; ``bound``: the
    upper ``STOP_CONFIDENCE`` re-draw quantile of ``gain - price``. The probe goes on unless that bound
    is under ``MIN_GAIN_LAYERS``: a difference the validation rows cannot tell from noise does not stop it."""

    gain: float
    price: float
    bound: float

    @property
    def go_on(self) -> bool:
        return self.bound >= MIN_GAIN_LAYERS

    def describe(self, rows: int, doubled: int) -> str:
        return (
            f"doubling {rows} rows to {doubled} saved {self.gain:+.2f} layers, the next doubling's fewer calibration "
            f"rows would cost {self.price:+.2f}: the net gain's upper {100 * STOP_CONFIDENCE:g}% bound over re-draws "
            f"of the validation rows is {self.bound:+.2f}, under {MIN_GAIN_LAYERS:g}"
        )


def doubling_verdict(
    previous: CandidateTable,
    current: CandidateTable,
    weights: torch.Tensor,
    *,
    budget: float,
    confidence: float,
    calibration_rows: int,
    next_calibration_rows: int,
) -> DoublingVerdict:
    """:class:`DoublingVerdict` of the heads behind ``current`` (trained on twice the rows of ``previous``'s),
    both on the same validation rows, re-drawn by ``weights`` (:func:`redraws`; row 0: the rows as they are)."""
    then = previous.predicted(weights, budget, confidence, calibration_rows)
    now = current.predicted(weights, budget, confidence, calibration_rows)
    gain = then - now
    price = current.predicted(weights, budget, confidence, next_calibration_rows) - now
    net = (gain - price)[1:] if weights.shape[0] > 1 else gain - price
    bound = float(torch.quantile(net, STOP_CONFIDENCE))
    return DoublingVerdict(float(gain[0]), float(price[0]), bound)


def encoded_subset(encoded, rows: list[int]):
    """The :class:`~earlyexit_kernels.training.labelled_texts.Encoded` rows ``rows``, in that order."""
    types = encoded.token_type_ids
    return dataclasses.replace(
        encoded,
        input_ids=[encoded.input_ids[i] for i in rows],
        token_type_ids=None if types is None else [types[i] for i in rows],
        truncated=0,  # said once, of every row
    )


def _fixed(count: int, fraction: float, order: list[int], reason: str, probed: int = 0) -> ShareChoice:
    """``fraction`` of the rows certify: the last ones of ``order``, never one of the first ``probed``."""
    keep = max(count - round(count * fraction), probed)
    return ShareChoice(sorted(order[:keep]), sorted(order[keep:]), reason)


def _cache_rows(cache, rows: int):
    """The first ``rows`` rows of an :class:`~earlyexit_kernels.training.cached_heads.ExitInputCache`."""

    def first(t):
        return None if t is None else t[:rows]

    return dataclasses.replace(
        cache,
        inputs=cache.inputs[:rows],
        halting_inputs=first(cache.halting_inputs),
        final_logits=cache.final_logits[:rows],
        labels=first(cache.labels),
        pooled=None,
    )


def choose_share(
    model,
    train,
    train_labels: torch.Tensor | None,
    validation,
    validation_labels: torch.Tensor | None,
    *,
    method: str,
    pooling: str | None,
    head: str | None,
    least: int,
    fraction: float,
    seed: int,
    budget: float,
    confidence: float,
    first: int = FIRST_PROBE_ROWS,
) -> ShareChoice:
    """Split the training rows ``train`` (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`, labels
    [N] or None) into head-training and calibration rows, as the module says; ``least``: the fewest
    calibration rows that can certify anything; ``fraction``: the share where nothing is probed;
    ``budget`` (a fraction) and ``confidence``: the certificate's."""
    from earlyexit_kernels.patching.patch import current_adapter, patch
    from earlyexit_kernels.training.cached_heads import cache_exit_inputs, cached_record
    from earlyexit_kernels.training.head_choice import AUTO
    from earlyexit_kernels.training.labelled_texts import length_sorted_batches
    from earlyexit_kernels.training.recipes import recipe
    from earlyexit_kernels.training.train import train_exit_heads

    count = len(train)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    chosen = recipe(method)
    stage = chosen.stages[0]
    if any(s.trains != "heads" for s in chosen.stages):
        # the backbone learns from the training rows too: a heads-only probe cannot tell what it needs
        return _fixed(count, fraction, order, f"--method {method} trains the backbone too: the fixed {fraction:g}")
    sizes, size = [], first
    while size <= count - least:
        sizes.append(size)
        size *= 2
    if len(sizes) < 2:
        return _fixed(count, fraction, order, f"too few rows to probe two sizes: the fixed {fraction:g}")

    probe = copy.deepcopy(model)
    policy = chosen.make_policy()
    pooling = "mean" if pooling in (None, AUTO) else pooling
    head = "mlp" if head in (None, AUTO) else head
    patch(probe, policy, "torch", pooling=pooling, head=head)
    probe.eval()
    objective = stage.objective if train_labels is not None else stage.unlabelled
    target = "accuracy" if train_labels is not None else "agreement"
    val_cache = cache_exit_inputs(probe, length_sorted_batches(validation, validation_labels, 64), progress=False)
    cached, scores, weights = None, [], redraws(len(validation), REDRAWS, seed)
    previous = current = None  # the candidate tables of the last two sizes: what a verdict compares
    for index, size in enumerate(sizes):
        done = 0 if cached is None else cached.num_rows
        rows = order[done:size]
        labels = None if train_labels is None else train_labels[rows]
        more = cache_exit_inputs(probe, length_sorted_batches(encoded_subset(train, rows), labels, 64), progress=False)
        cached = more if cached is None else _concatenated(cached, more)
        probe.early_exit_heads.set_form(head, None, current_adapter(probe).final_classifier)  # fresh heads
        train_exit_heads(
            probe,
            _cache_rows(cached, size),
            method=objective,
            trains="heads",
            lr=stage.lr,
            epochs=stage.epochs,
            loss_kwargs=stage.loss_kwargs,
            heads_lr=stage.heads_lr,
            val_batches=val_cache,
            progress=False,
            seed=seed,
        )
        probe.eval()
        previous, current = current, CandidateTable.of(cached_record(probe, val_cache), policy, target)
        predicted = current.predicted(weights[:1], budget, confidence, count - size)
        scores.append((size, float(predicted[0])))
        if index == 0 or index + 1 == len(sizes):
            continue  # two sizes before any verdict; the last one has no next doubling
        verdict = doubling_verdict(
            previous,
            current,
            weights,
            budget=budget,
            confidence=confidence,
            calibration_rows=count - size,
            next_calibration_rows=count - sizes[index + 1],
        )
        if not verdict.go_on:
            reason = verdict.describe(sizes[index - 1], size)
            return ShareChoice(sorted(order[:size]), sorted(order[size:]), reason, scores)
    reason = (
        f"no doubling up to {sizes[-1]} rows (the most that leave {least} to certify) was shown not to pay: the "
        f"fixed {fraction:g}, or the rows probed where more"
    )
    fixed = _fixed(count, fraction, order, reason, probed=sizes[-1])
    return ShareChoice(fixed.train, fixed.calibration, reason, scores)


def _concatenated(first, second):
    def joined(a, b):
        return None if a is None else torch.cat([a, b])

    return dataclasses.replace(
        first,
        inputs=torch.cat([first.inputs, second.inputs]),
        halting_inputs=joined(first.halting_inputs, second.halting_inputs),
        final_logits=torch.cat([first.final_logits, second.final_logits]),
        labels=joined(first.labels, second.labels),
        pooled=None,
    )
