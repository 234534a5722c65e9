"""How many training rows ``eek fit`` keeps out to certify on, chosen on the rows themselves.

The exit heads need far fewer rows than the bound does: a head reads one layer's vector and
converges on a thousand rows or so, while certifying a loss under one point at 95% wants
thousands of rows (1% at 95% on 343 rows allows no error at all). A fixed quarter of the file
starves the bound on a large file and can starve the heads on a small one. So the share is
measured: the heads (the method's first, heads-only stage, on a copy of the model) are trained
on growing prefixes of a random order of the training rows, ``FIRST_PROBE_ROWS`` then twice
as many each time, and scored on the validation rows (each internal head's accuracy, or
agreement with the full model, averaged over the layers). The probe stops once a doubling
gains less than the score's standard error on the validation rows (no measurable gain; at
least ``CONVERGED_GAIN``); the rows it reached train the heads, every later row of the order
certifies. Calibration rows are never read by the probe: the share is fixed by rows that
end up training, so the certificate stays exact.

Where there is nothing to probe (a recipe that trains the backbone too, too few rows for two
sizes), the fixed ``CALIBRATION_FRACTION`` applies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

__all__ = ["FIRST_PROBE_ROWS", "CONVERGED_GAIN", "ShareChoice", "choose_share", "encoded_subset"]

#: the first prefix the probe trains the heads on; each next one is twice as long
FIRST_PROBE_ROWS = 256
#: the least gain of a doubling (a fraction of the validation score) that keeps the probe going
CONVERGED_GAIN = 0.005


@dataclass
class ShareChoice:
    """The split: ``train`` and ``calibration`` (row indices of the training rows, disjoint), how it was
    chosen (``probe``: ``(rows, score)`` per prefix tried; ``reason``)."""

    train: list[int]
    calibration: list[int]
    reason: str
    probe: list[tuple[int, float]] = field(default_factory=list)

    def describe(self, measure: str) -> str:
        if not self.probe:
            return f"calibration share: {self.reason}"
        tried = ", ".join(f"{rows} rows {100 * score:.1f}%" for rows, score in self.probe)
        return (
            f"calibration share chosen on the rows: the heads' mean {measure} on validation after training on "
            f"{tried}; {self.reason}: {len(self.train)} rows train the heads, {len(self.calibration)} certify"
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
    *,
    method: str,
    pooling: str | None,
    head: str | None,
    least: int,
    fraction: float,
    seed: int,
    first: int = FIRST_PROBE_ROWS,
) -> ShareChoice:
    """Split the training rows ``train`` (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`, labels
    [N] or None) into head-training and calibration rows, as the module says; ``least``: the fewest
    calibration rows that can certify anything; ``fraction``: the share where nothing is probed."""
    from earlyexit_kernels.patching.patch import current_adapter, patch
    from earlyexit_kernels.training.cached_heads import cache_exit_inputs, cached_record
    from earlyexit_kernels.training.calibration import static_baseline
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
        layer_scores = static_baseline(cached_record(probe, val_cache), target=target)[:-1]
        scores.append((size, sum(score for _, score in layer_scores) / len(layer_scores)))
        score = scores[-1][1]
        noise = math.sqrt(max(score * (1 - score), 0.0) / max(len(validation), 1))
        if len(scores) >= 2 and score - scores[-2][1] < max(CONVERGED_GAIN, noise):
            reason = (
                f"doubling {scores[-2][0]} rows to {size} gained {100 * (score - scores[-2][1]):+.2f} points, under "
                f"the validation score's standard error ({100 * noise:.2f}) or {100 * CONVERGED_GAIN:g}"
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
