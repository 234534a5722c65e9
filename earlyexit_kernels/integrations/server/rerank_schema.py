"""The ``POST /rerank`` request and answer, in text-embeddings-inference's shapes.

Request: ``{"query": "...", "texts": ["...", ...], "raw_scores": false, "return_text": false,
"truncate": false, "truncation_direction": "Right"}``. Each text is scored as the pair
``(query, text)`` by a one-output model (a cross-encoder, ``num_labels == 1``).

Answer: one ``{"index", "score"}`` per text (``"text"`` too with ``return_text``), highest
score first, equal scores in input order; ``score`` is ``sigmoid(logit)``, or the logit
with ``raw_scores``. Each entry also carries its ``exit_layer`` and ``layers_run``.

The request is :class:`.bodies.TeiRerankRequest` (a pydantic model: its schema and its validation);
``/rerank`` also takes Cohere's shape (a body with ``documents``): :mod:`.cohere_rerank_schema`.
"""

from __future__ import annotations

import math

__all__ = ["format_rerank_answer", "ranking"]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def ranking(finished: list, raw_scores: bool) -> list[tuple[int, float]]:
    """``(index, score)`` of each text, best first, equal scores in input order: ``sigmoid(logit)``,
    or the logit with ``raw_scores``."""
    logits = [float(done.logits.float()[0]) for done in finished]
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    return [(i, logits[i] if raw_scores else _sigmoid(logits[i])) for i in order]


def format_rerank_answer(request, finished: list) -> list[dict]:
    """The answer to ``request`` from each text's finished sequence (``logits`` [1], ``exit_layer``, ``layers_run``)."""
    answer = []
    for i, score in ranking(finished, request.raw_scores):
        entry = {"index": i, "score": score}
        if request.return_text:
            entry["text"] = request.texts[i]
        entry["exit_layer"] = finished[i].exit_layer
        entry["layers_run"] = finished[i].layers_run
        answer.append(entry)
    return answer
