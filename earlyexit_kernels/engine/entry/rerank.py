"""``eek.rerank``: score (query, passage) pairs with an early-exit cross-encoder, best first.

    for r in eek.rerank(model, "what is a kernel?", passages, tokenizer=tok, top_n=10):
        r.index, r.score, r.exit_layer, r.layers_run

A cross-encoder is a sequence classifier with one output (``num_labels == 1``) read on
the pair ``(query, passage)``; :class:`earlyexit_kernels.ScoreBand` lets a passage whose
score is already clearly low (or high) leave early. The pairs run through
:func:`earlyexit_kernels.classify`, so each score equals the patched model's on that
pair alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from earlyexit_kernels.engine.entry.classify import classify

__all__ = ["Ranked", "rerank", "rank_order"]


@dataclass(frozen=True)
class Ranked:
    """One passage: ``index`` in ``texts``, ``score`` (``sigmoid(logit)``, or the logit with
    ``raw_scores``), ``exit_layer`` and ``layers_run``, and ``text`` when asked for."""

    index: int
    score: float
    exit_layer: int
    layers_run: int
    text: str | None = None


def rank_order(scores: Sequence[float]) -> list[int]:
    """Indices of ``scores`` from the highest to the lowest; equal scores keep their input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def rerank(
    model,
    query: str,
    texts: Sequence[str],
    *,
    tokenizer,
    raw_scores: bool = False,
    return_text: bool = False,
    top_n: int | None = None,
    max_batch_size: int = 64,
    max_length: int | None = None,
    **classify_options,
) -> list[Ranked]:
    """Score every ``(query, text)`` with the patched one-output ``model``; :class:`Ranked` best first.

    ``tokenizer`` encodes each pair as the model was trained (``tokenizer(query, text)``).
    ``raw_scores``: the logit instead of its sigmoid (the order is the same). ``top_n``:
    keep only the best ``top_n``. ``max_length``: longer pairs are truncated (one warning).
    Other options go to :func:`earlyexit_kernels.classify`.
    """
    if model.config.num_labels != 1:
        raise ValueError(
            f"rerank needs a cross-encoder with one output (num_labels == 1) but the model has "
            f"num_labels={model.config.num_labels}; use eek.classify for classifiers"
        )
    if not isinstance(query, str) or not query:
        raise ValueError(f"query must be a non-empty string, got {query!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings (one per passage), not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise ValueError(f"top_n must be an integer >= 1 or None, got {top_n!r}")
    pairs = [(query, text) for text in texts]
    predictions = list(
        classify(
            model,
            pairs,
            tokenizer=tokenizer,
            max_batch_size=max_batch_size,
            max_length=max_length,
            **classify_options,
        )
    )
    logits = [float(p.logits.float()[0]) for p in predictions]
    scores = logits if raw_scores else [_sigmoid(z) for z in logits]
    order = rank_order(logits)[:top_n]
    return [
        Ranked(
            i,
            scores[i],
            predictions[i].exit_layer,
            predictions[i].layers_run,
            texts[i] if return_text else None,
        )
        for i in order
    ]
