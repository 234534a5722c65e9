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
quantile of the confidence). More training rows make better
heads; fewer calibration rows make a looser bound; the prediction weighs both. The probe stops
once a doubling predicts fewer than ``MIN_GAIN_LAYERS`` layers saved; the rows it reached train
the heads, every later row of the order certifies. The probe reads only rows that end up
training and the validation rows, never a calibration row, so the certificate stays exact.

Where there is nothing to probe (a recipe that trains the backbone too, too few rows for two
sizes), the fixed ``CALIBRATION_FRACTION`` applies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

__all__ = ["FIRST_PROBE_ROWS", "MIN_GAIN_LAYERS", "ShareChoice", "choose_share", "encoded_subset", "predicted_layers"]

#: the first prefix the probe trains the heads on; each next one is twice as long
FIRST_PROBE_ROWS = 256
#: the mean layers a doubling of the training rows must be predicted to save for the probe to go on
MIN_GAIN_LAYERS = 0.05


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
    from statistics import NormalDist

    from earlyexit_kernels.methods.risk_control import is_binary, rows_to_certify
    from earlyexit_kernels.training.certified_calibration import certified_candidates, row_losses
    from earlyexit_kernels.training.exit_record import replay

    z = NormalDist().inv_cdf(confidence)
    num_layers, _, num_labels = record.all_logits.shape
    layers = float(num_layers)
    if calibration_rows < rows_to_certify(0.0, budget, confidence):
        return layers
    for candidate in certified_candidates(policy, num_layers, num_labels):
        out = replay(candidate, record)
        losses = row_losses(out.logits, record, target)
        rate = float(losses.mean())
        if is_binary(losses):  # the exact binomial, as certification counts 0/1 losses
            needed = rows_to_certify(rate, budget, confidence)
            fails = needed is None or needed > calibration_rows
        else:
            fails = rate + z * float(losses.std()) / math.sqrt(calibration_rows) > budget
        if fails:
            break
        layers = out.layers_run.float().mean().item()
    return layers


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
    cached, scores = None, []
    for size in sizes:
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
        record = cached_record(probe, val_cache)
        scores.append((size, predicted_layers(record, policy, budget, confidence, count - size, target)))
        if len(scores) >= 2 and scores[-2][1] - scores[-1][1] < MIN_GAIN_LAYERS:
            reason = (
                f"doubling {scores[-2][0]} rows to {size} saved {scores[-2][1] - scores[-1][1]:+.2f} layers, under "
                f"{MIN_GAIN_LAYERS:g}"
            )
            return ShareChoice(sorted(order[:size]), sorted(order[size:]), reason, scores)
    reason = f"still gaining at {sizes[-1]} rows, the most that leave {least} to certify: the fixed {fraction:g}"
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
