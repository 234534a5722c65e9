"""From exit logits to what a user reads: the label's name and its probability."""

from __future__ import annotations

import torch

__all__ = ["labels_and_scores"]


def labels_and_scores(logits: torch.Tensor, config) -> tuple[list, list[float]]:
    """``logits`` [N, C] -> (the ``id2label`` name of each row's argmax, its softmax probability).

    A regression head (``num_labels == 1``) has no label: ``label`` is None and ``score``
    is the predicted value.
    """
    logits = logits.float()
    if logits.shape[-1] == 1:
        return [None] * logits.shape[0], logits[:, 0].tolist()
    probabilities = logits.softmax(dim=-1)
    scores, classes = probabilities.max(dim=-1)
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(c, id2label.get(str(c), f"LABEL_{c}")) for c in classes.tolist()]
    return names, scores.tolist()
