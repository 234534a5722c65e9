"""The ``POST /rerank`` request and answer, in text-embeddings-inference's shapes.

Request: ``{"query": "...", "texts": ["...", ...], "raw_scores": false, "return_text": false,
"truncate": false, "truncation_direction": "Right"}``. Each text is scored as the pair
``(query, text)`` by a one-output model (a cross-encoder, ``num_labels == 1``).

Answer: one ``{"index", "score"}`` per text (``"text"`` too with ``return_text``), highest
score first, equal scores in input order; ``score`` is ``sigmoid(logit)``, or the logit
with ``raw_scores``. Each entry also carries its ``exit_layer`` and ``layers_run``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from earlyexit_kernels.integrations.server.predict_schema import RequestError, flag, truncation_direction

__all__ = ["RerankRequest", "parse_rerank_request", "format_rerank_answer"]

_FIELDS = ("query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction")


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
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(
            400, "Validation", f'the body is not valid JSON ({error}); send {{"query": "...", "texts": [...]}}'
        ) from None
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


def format_rerank_answer(request: RerankRequest, finished: list) -> list[dict]:
    """The answer to ``request`` from each text's finished sequence (``logits`` [1], ``exit_layer``, ``layers_run``)."""
    logits = [float(done.logits.float()[0]) for done in finished]
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    answer = []
    for i in order:
        entry = {"index": i, "score": logits[i] if request.raw_scores else _sigmoid(logits[i])}
        if request.return_text:
            entry["text"] = request.texts[i]
        entry["exit_layer"] = finished[i].exit_layer
        entry["layers_run"] = finished[i].layers_run
        answer.append(entry)
    return answer
