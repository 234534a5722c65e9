"""``POST /classify`` and ``POST /v1/classify``: classification in the shape Infinity and vLLM serve.

Request: ``{"model": NAME, "input": "..." | ["...", ...], "raw_scores": false, "truncate": false}``.
``model`` may be left out (:mod:`.served_model`); ``input`` is one text or a list of texts
(Infinity takes a list, vLLM either); ``raw_scores`` (Infinity's) answers the logits instead
of the probabilities; ``truncate`` cuts a text longer than the model takes (otherwise 413, as
``/predict``); ``user`` (OpenAI's) is accepted and ignored.

Answer (Infinity's ``/classify`` shape)::

    {"object": "classify", "data": [[{"label", "score", "exit_layer", "layers_run"}, ...], ...],
     "model": NAME, "usage": {"prompt_tokens": N, "total_tokens": N}, "id": REQUEST_ID, "created": UNIX_TIME}

one list per input, in input order, every label with its score best first, the scores of
``/predict`` (:func:`.predict_schema.format_answer`). ``usage`` counts the tokens the model read,
special tokens included; ``id`` is the request id (the ``x-request-id`` header). vLLM's own
``/classify`` answers one ``{"index", "label", "probs", "num_classes"}`` per input instead; a
client of it reads the best label as ``data[i][0]["label"]`` here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from earlyexit_kernels.integrations.server.predict_schema import (
    TEXT_SCHEMA,
    RequestError,
    flag,
    format_answer,
    read_json,
)
from earlyexit_kernels.integrations.server.served_model import check_model, model_field_schema

__all__ = [
    "ClassifyRequest",
    "classify_request_schema",
    "format_classify_answer",
    "parse_classify_request",
    "usage",
]

_FIELDS = ("model", "input", "raw_scores", "truncate", "user")


@dataclass(frozen=True)
class ClassifyRequest:
    texts: list[str]
    raw_scores: bool
    truncate: bool

    @property
    def sequences(self) -> list[tuple[str, None]]:
        return [(text, None) for text in self.texts]


def parse_classify_request(raw: bytes, model_id: str) -> ClassifyRequest:
    """The request body -> :class:`ClassifyRequest` for a server of ``model_id``; :class:`RequestError` says what is wrong."""
    body = read_json(raw, '{"input": ["a text", ...]}')
    if not isinstance(body, dict) or "input" not in body:
        raise RequestError(422, "Validation", 'the body must be a JSON object with "input": a text or a list of texts')
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise RequestError(
            422, "Validation", f"unknown field(s) {', '.join(unknown)}; /classify takes {', '.join(_FIELDS)}"
        )
    check_model(body, model_id)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(422, "Validation", f"user must be a string, got {json.dumps(user)}")
    raw_scores, truncate = flag(body, "raw_scores"), flag(body, "truncate")
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RequestError(
            422, "Validation", f"input must be a text or a list of texts, got {json.dumps(body['input'])}"
        )
    if not texts:
        raise RequestError(400, "Empty", "input is an empty list; send at least one text")
    for index, text in enumerate(texts):
        if not text:
            raise RequestError(400, "Empty", f"input {index} is an empty text; send at least one character")
    return ClassifyRequest(texts, raw_scores, truncate)


def usage(tokens: int) -> dict:
    """OpenAI's ``usage`` of a request whose texts held ``tokens`` tokens (nothing is generated)."""
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def format_classify_answer(
    request: ClassifyRequest,
    finished: list,
    *,
    id2label: dict,
    multi_label: bool,
    model_id: str,
    request_id: str,
    tokens: int,
    created: int,
) -> dict:
    """The answer to ``request`` from each text's finished sequence."""
    data = [
        format_answer(done.logits, done.exit_layer, done.layers_run, id2label, request.raw_scores, multi_label)
        for done in finished
    ]
    return {
        "object": "classify",
        "data": data,
        "model": model_id,
        "usage": usage(tokens),
        "id": request_id,
        "created": created,
    }


def classify_request_schema(model_id: str) -> dict:
    """The JSON Schema of a ``/classify`` body on a server of ``model_id``."""
    return {
        "type": "object",
        "required": ["input"],
        "additionalProperties": False,
        "properties": {
            "model": model_field_schema(model_id),
            "input": {"anyOf": [TEXT_SCHEMA, {"type": "array", "minItems": 1, "items": TEXT_SCHEMA}]},
            "raw_scores": {"type": "boolean", "default": False, "description": "the logits instead of probabilities"},
            "truncate": {"type": "boolean", "default": False},
            "user": {"type": ["string", "null"], "description": "accepted and ignored"},
        },
    }
