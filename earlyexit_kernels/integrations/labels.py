"""From exit logits to what a user reads: the label's name and its probability."""

from __future__ import annotations

import torch

__all__ = ["is_multi_label", "label_name", "label_probabilities", "labels_and_scores", "name_in"]

MULTI_LABEL = "multi_label_classification"


def is_multi_label(config) -> bool:
    """Whether the model has one independent sigmoid per label (``problem_type`` multi-label)."""
    return getattr(config, "problem_type", None) == MULTI_LABEL


def label_name(config, index: int) -> str:
    """The ``id2label`` name of class ``index`` (``LABEL_i`` where there is none)."""
    return name_in(getattr(config, "id2label", None) or {}, index)


def name_in(id2label: dict, index: int) -> str:
    """Class ``index``'s name in ``id2label`` (keys as integers or, read from JSON, as strings), else ``LABEL_i``."""
    return str(id2label.get(index, id2label.get(str(index), f"LABEL_{index}")))


def label_probabilities(logits: torch.Tensor, config) -> list[dict[str, float]]:
    """Multi-label ``logits`` [N, C] -> per row, every label's name and ``sigmoid`` probability, in label order."""
    names = [label_name(config, c) for c in range(logits.shape[-1])]
    return [dict(zip(names, row)) for row in torch.sigmoid(logits.float()).tolist()]


def labels_and_scores(logits: torch.Tensor, config) -> tuple[list, list[float]]:
    """``logits`` [N, C] -> (the ``id2label`` name of each row's argmax, its softmax probability).

    A regression head (``num_labels == 1``) has no label: ``label`` is None and ``score``
    is the predicted value. A multi-label model (:func:`is_multi_label`): ``label`` is
    the names of the labels whose sigmoid probability exceeds 0.5, joined by ``","``
    (empty when none does), ``score`` the highest label probability; every label's
    probability is :func:`label_probabilities`.
    """
    logits = logits.float()
    if is_multi_label(config):
        names = [label_name(config, c) for c in range(logits.shape[-1])]
        chosen = [",".join(n for n, z in zip(names, row) if z > 0) for row in logits.tolist()]
        return chosen, torch.sigmoid(logits).amax(-1).tolist()
    if logits.shape[-1] == 1:
        return [None] * logits.shape[0], logits[:, 0].tolist()
    probabilities = logits.softmax(dim=-1)
    scores, classes = probabilities.max(dim=-1)
    names = [label_name(config, c) for c in classes.tolist()]
    return names, scores.tolist()
