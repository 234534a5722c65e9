"""The ``POST /rerank`` request and answer, in text-embeddings-inference's shapes.

Request: ``{"query": "...", "texts": ["...", ...], "raw_scores": false, "return_text": false,
"truncate": false, "truncation_direction": "Right"}``. Each text is scored as the pair
``(query, text)`` by a one-output model (a cross-encoder, ``num_labels == 1``).

Answer: one ``{"index", "score"}`` per text (``"text"`` too with ``return_text``), highest
score first, equal scores in input order; ``score`` is ``sigmoid(logit)``, or the logit
with ``raw_scores``. Each entry also carries its ``exit_layer`` and ``layers_run``.

``/rerank`` also takes Cohere's shape (a body with ``documents``): :mod:`.cohere_rerank_schema`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from earlyexit_kernels.integrations.server.predict_schema import (
    TEXT_SCHEMA,
    RequestError,
    flag,
    read_json,
    truncation_direction,
)

__all__ = [
    "RERANK_REQUEST_SCHEMA",
    "RerankRequest",
    "format_rerank_answer",
    "parse_rerank_request",
    "ranking",
    "rerank_request_from_body",
]

_FIELDS = ("query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction")
_FLAG = {"type": "boolean", "default": False}
RERANK_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["query", "texts"],
    "additionalProperties": False,
    "properties": {
        "query": TEXT_SCHEMA,
        "texts": {"type": "array", "minItems": 1, "items": TEXT_SCHEMA},
        "raw_scores": _FLAG,
        "return_text": _FLAG,
        "truncate": _FLAG,
        "truncation_direction": {"enum": ["Left", "Right"], "default": "Right"},
    },
}


@dataclass(frozen=True)
class RerankRequest:
    query: str
    texts: list[str]
    raw_scores: bool
    return_text: bool
    truncate: bool
    truncation_direction: str

    @property
    def sequences(self) -> list[tuple[str, str]]:
        """``(query, text)`` per text, what the model reads."""
        return [(self.query, text) for text in self.texts]


def parse_rerank_request(raw: bytes) -> RerankRequest:
    """The request body -> :class:`RerankRequest`; :class:`RequestError` says what is wrong."""
    return rerank_request_from_body(read_json(raw, '{"query": "...", "texts": [...]}'))


def rerank_request_from_body(body) -> RerankRequest:
    """The parsed body (TEI's shape) -> :class:`RerankRequest`; :class:`RequestError` says what is wrong."""
    if not isinstance(body, dict) or "query" not in body or "texts" not in body:
        raise RequestError(
            422, "Validation", 'the body must be a JSON object with "query" (a text) and "texts" (a list)'
        )
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise RequestError(
            422, "Validation", f"unknown field(s) {', '.join(unknown)}; /rerank takes {', '.join(_FIELDS)}"
        )
    query, texts = body["query"], body["texts"]
    if not isinstance(query, str):
        raise RequestError(422, "Validation", f"query must be a string, got {json.dumps(query)}")
    if not query:
        raise RequestError(400, "Empty", "query is an empty text; send at least one character")
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RequestError(422, "Validation", "texts must be a list of strings")
    if not texts:
        raise RequestError(400, "Empty", "texts is an empty list; send at least one text")
    for index, text in enumerate(texts):
        if not text:
            raise RequestError(400, "Empty", f"texts[{index}] is an empty text; send at least one character")
    return RerankRequest(
        query,
        texts,
        flag(body, "raw_scores"),
        flag(body, "return_text"),
        flag(body, "truncate"),
        truncation_direction(body),
    )


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


def format_rerank_answer(request: RerankRequest, finished: list) -> list[dict]:
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
