"""Each row's loss, the one definition every certificate, the audit and re-certification count.

A loss compares the early exit's logits with the full model's (the last layer's head) on one row:

- :func:`disagreement`, in [0, 1]: single-label, 1 where the argmax differs; multi-label (and one
  output, a cross-encoder's score), the fraction of labels on the other side of 0. No label needed.
- :func:`accuracy_lost`, in [-1, 1]: paired against the labels (:func:`paired_loss`): 1 where only the
  full model is right, -1 where only the exit is, else 0 (multi-label: per label, averaged over the
  row's labels). Its mean is the accuracy points lost / 100.
- :func:`missed_top_k`, in [0, 1] per query of a reranker: the fraction of the full model's top ``k``
  the early exit's ranking misses (1 - :func:`query_recalls`).

:func:`row_losses` picks the loss of a certificate's target on an
:class:`~earlyexit_kernels.calibration.record.ExitRecord`.
"""

from __future__ import annotations

import math

import torch

from earlyexit_kernels.calibration.record import ExitRecord, is_multi_label_record

__all__ = [
    "accuracy_lost",
    "disagreement",
    "missed_top_k",
    "paired_loss",
    "query_recalls",
    "row_losses",
    "top_k_recall",
]


def disagreement(early: torch.Tensor, full: torch.Tensor, *, multi_label: bool = False) -> torch.Tensor:
    """Each row's disagreement in [0, 1] between the early exit's ``early`` and the full model's ``full``
    logits [n, C]: float64 [n].

    Single-label: 1.0 where the argmax differs, else 0.0. ``multi_label``: the fraction of labels on
    the other side of 0. One output (C == 1): whether the score is on the other side of 0.
    """
    early, full = early.float(), full.float()
    if multi_label or early.shape[-1] == 1:
        return ((early > 0) != (full > 0)).double().mean(-1)
    return (early.argmax(-1) != full.argmax(-1)).double()


def paired_loss(exit_right, full_right):
    """The accuracy one row (or label) loses by exiting early: 1 where only the full model is right, -1 where
    only the exit is, else 0. Bools or ints give an int; bool tensors give float64."""
    if isinstance(exit_right, torch.Tensor):
        return full_right.double() - exit_right.double()
    return int(full_right) - int(exit_right)


def accuracy_lost(
    early: torch.Tensor, full: torch.Tensor, labels: torch.Tensor, *, multi_label: bool = False
) -> torch.Tensor:
    """Each row's paired accuracy lost (:func:`paired_loss`) by the early exit's ``early`` logits [n, C] against
    the full model's ``full``, given ``labels`` [n] (multi-label: 0/1 [n, C], averaged per row): float64 [n]."""
    early, full = early.float(), full.float()
    if multi_label:
        truth = labels > 0.5
        return paired_loss((early > 0) == truth, (full > 0) == truth).mean(-1)
    return paired_loss(early.argmax(-1) == labels, full.argmax(-1) == labels)


def row_losses(logits: torch.Tensor, record: ExitRecord, target: str) -> torch.Tensor:
    """Each calibration row's loss under ``target`` for the early exit's ``logits`` [N, C]: float64 [N].

    ``"agreement"``: :func:`disagreement`, in [0, 1]; ``"accuracy"``: :func:`accuracy_lost`, paired, in
    [-1, 1], its mean the accuracy lost."""
    full, multi_label = record.full_logits, is_multi_label_record(record)
    if target == "agreement":
        return disagreement(logits, full, multi_label=multi_label)
    return accuracy_lost(logits, full, record.labels, multi_label=multi_label)


def query_recalls(scores: torch.Tensor, full_scores: torch.Tensor, groups: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Each query's recall of the full model's top ``k`` (float64 [queries], in the order of ``unique(groups)``).

    ``scores``, ``full_scores``: [N]; ``groups``: [N] query of each row. Ties in a top k go to the earlier
    row, as :func:`earlyexit_kernels.engine.entry.rerank.rank_order` does."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    groups = torch.as_tensor(groups).reshape(-1)
    _, query = torch.unique(groups, return_inverse=True)
    order = torch.sort(query, stable=True).indices  # rows by query, each query's rows in their order
    sizes = torch.bincount(query)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(order.numel()) - starts[query[order]]
    width = int(sizes.max())

    def top_of(values: torch.Tensor) -> torch.Tensor:
        table = torch.full((sizes.numel(), width), -math.inf, dtype=torch.float64)
        table[query[order], slot] = values[order].double()
        # descending and stable: ties go to the earlier row, and padding (after every row) last
        rank = torch.empty_like(table, dtype=torch.long)
        ranking = torch.sort(table, dim=1, descending=True, stable=True).indices
        rank.scatter_(1, ranking, torch.arange(width).expand_as(ranking).contiguous())
        return rank < torch.clamp(sizes, max=k)[:, None]

    size = torch.clamp(sizes, max=k).double()
    return (top_of(scores) & top_of(full_scores)).sum(1).double() / size


def missed_top_k(scores: torch.Tensor, full_scores: torch.Tensor, groups: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Each query's loss in [0, 1]: the fraction of the full model's top ``k`` the early exit's ranking misses.

    ``scores``, ``full_scores``, ``groups``: [N]; returns float64 [queries] (:func:`query_recalls`' order)."""
    return 1.0 - query_recalls(scores, full_scores, groups, k)


def top_k_recall(scores: torch.Tensor, full_scores: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of ``|top_k(scores) & top_k(full_scores)| / min(k, n_query)`` (:func:`query_recalls`)."""
    return float(query_recalls(scores, full_scores, groups, k).mean())
