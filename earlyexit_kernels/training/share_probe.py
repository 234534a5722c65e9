"""The probe behind ``eek fit``'s calibration share: heads trained on growing prefixes of the training rows.

What the share is and why it is measured, and the verdict on each doubling, are
:mod:`earlyexit_kernels.calibration.share` (tensor code over the validation rows' recorded logits);
this module trains the heads of a copy of the model on ``FIRST_PROBE_ROWS`` rows, then twice as many
each time, records them on the validation rows and asks that module whether to go on
(:func:`choose_share`). The probe reads only rows that end up training and the validation rows,
never a calibration row, so the certificate stays exact.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from earlyexit_kernels.calibration.share import REDRAWS, CandidateTable, doubling_verdict, redraws

__all__ = ["FIRST_PROBE_ROWS", "ShareChoice", "ShareSettings", "choose_share", "encoded_subset"]

#: the first prefix the probe trains the heads on; each next one is twice as long
FIRST_PROBE_ROWS = 256


@dataclass(frozen=True)
class ShareSettings:
    """What the probe needs besides the rows: the fit's ``method``, ``pooling`` and ``head`` (None or
    ``"auto"``: the probe's mean-pooled MLP heads), ``least`` (the fewest calibration rows that can certify
    anything), ``fraction`` (the share where nothing is probed), ``seed``, the certificate's ``budget`` (a
    fraction) and ``confidence``, and ``first``: the first prefix's rows."""

    method: str
    pooling: str | None
    head: str | None
    least: int
    fraction: float
    seed: int
    budget: float
    confidence: float
    first: int = FIRST_PROBE_ROWS


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
    settings: ShareSettings,
) -> ShareChoice:
    """Split the training rows ``train`` (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`, labels
    [N] or None) into head-training and calibration rows, as :mod:`earlyexit_kernels.calibration.share`
    says, with ``settings`` (:class:`ShareSettings`)."""
    method, pooling, head, least = settings.method, settings.pooling, settings.head, settings.least
    fraction, seed, budget, confidence = settings.fraction, settings.seed, settings.budget, settings.confidence
    first = settings.first
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
    if chosen.encoder_stages:
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
        if index == 0:
            continue  # two sizes before any verdict
        # past the last size the next step is the fixed share's, shorter than a doubling: its gain is the last
        # doubling's times its length in doublings (a learning curve straight in log rows)
        last = index + 1 == len(sizes)
        following = max(count - round(count * fraction), size) if last else sizes[index + 1]
        if following == size:
            continue
        verdict = doubling_verdict(
            previous,
            current,
            weights,
            budget=budget,
            confidence=confidence,
            calibration_rows=count - size,
            next_calibration_rows=count - following,
            step=math.log2(following / size),
        )
        if not verdict.go_on:
            reason = verdict.describe(sizes[index - 1], size, following)
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
