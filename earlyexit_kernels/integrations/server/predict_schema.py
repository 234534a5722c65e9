"""The ``POST /predict`` request and answer, in text-embeddings-inference's shapes.

Request: ``{"inputs": ..., "truncate": false, "raw_scores": false, "truncation_direction": "Right"}``
where ``inputs`` is

- a text: ``"I liked it"``;
- a text pair: ``["first text", "second text"]`` (one or two strings);
- a batch: ``[["a text"], ["first", "second"], ...]`` (lists of one or two strings).

``truncate`` cuts a text longer than the model takes, at its end (``"Right"``) or its
start (``"Left"``). Answer: for one input, a list of ``{"score", "label"}`` over every
label, highest score first (softmax probabilities; for a multi-label model each label's
sigmoid probability; the raw logits with ``raw_scores``); for a batch, one
such list per input, in input order. Each entry also carries the input's ``exit_layer``
and ``layers_run``, which clients written for text-embeddings-inference ignore.

Errors are ``{"error": message, "error_type": kind}`` with the status codes of
text-embeddings-inference: 400 (malformed JSON, empty input), 422 (a wrong shape), 413
(too long without ``truncate``, too many inputs), 429 (queue full), 503 (shutting down).

The request is :class:`.bodies.PredictRequest` (a pydantic model: its schema and validation), its
``inputs`` read by :func:`predict_inputs`, whose messages say what to change in each shape; the answer's
and the error body's schemas are generated from :mod:`.bodies`' models (``PredictAnswer``, ``Error``).
"""

from __future__ import annotations

import json

import torch

__all__ = [
    "INPUTS_SCHEMA",
    "TEXT_SCHEMA",
    "RequestError",
    "count",
    "format_answer",
    "predict_inputs",
    "read_json",
]


class RequestError(Exception):
    """A request the server refuses: ``status``, ``error_type`` and a message saying what to change."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


#: a text the model reads: at least one character
TEXT_SCHEMA = {"type": "string", "minLength": 1}
_ONE_OR_TWO_TEXTS = {
    "type": "array",
    "prefixItems": [TEXT_SCHEMA, {"type": "string"}],
    "minItems": 1,
    "maxItems": 2,
    "description": "one text, or a pair of two texts read as one input",
}
#: ``inputs``' JSON Schema (a union JSON Schema states and pydantic's types do not: a pair is not a batch)
INPUTS_SCHEMA = {
    "anyOf": [
        TEXT_SCHEMA,
        _ONE_OR_TWO_TEXTS,
        {"type": "array", "minItems": 1, "items": _ONE_OR_TWO_TEXTS, "description": "a batch"},
    ],
    "description": 'a text, a pair ["a", "b"] (two strings are one pair, not a batch of two), '
    'or a batch [["a"], ["b", "c"]]',
}


def read_json(raw: bytes, send: str):
    """The body parsed; 400 saying to ``send`` the route's shape when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, "Validation", f"the body is not valid JSON ({error}); send {send}") from None
    except RecursionError:
        raise RequestError(400, "Validation", f"the body nests too deeply to read; send {send}") from None


_SHAPES = 'a text "...", a pair ["...", "..."], or a batch [["..."], ["...", "..."], ...]'


def predict_inputs(inputs) -> tuple[list[tuple[str, str | None]], bool]:
    """``/predict``'s ``inputs`` -> (text, second text or None) per input, and whether it is a batch (the answer a
    list of lists); :class:`RequestError` says what is wrong with the shape."""
    if isinstance(inputs, str):
        return [_sequence([inputs], 0)], False
    if not isinstance(inputs, list):
        raise RequestError(422, "Validation", f"inputs must be {_SHAPES}; got {type(inputs).__name__}")
    if not inputs:
        raise RequestError(400, "Empty", "inputs is an empty list; send at least one text")
    if all(isinstance(item, str) for item in inputs):
        if len(inputs) > 2:
            raise RequestError(
                422,
                "Validation",
                f"inputs is a list of {len(inputs)} strings; a pair has 2. For a batch, wrap each "
                f'text in a list: [["text 1"], ["text 2"], ...]',
            )
        return [_sequence(inputs, 0)], False
    sequences = []
    for index, item in enumerate(inputs):
        if not isinstance(item, list):
            raise RequestError(
                422, "Validation", f"inputs[{index}] must be a list of one or two strings in a batch ({_SHAPES})"
            )
        sequences.append(_sequence(item, index))
    return sequences, True


def count(body: dict, name: str) -> int | None:
    """The field ``name`` of ``body``: None when absent or null, else an integer >= 1; 422 otherwise.

    A whole number written as a float (``3.0``) counts: JSON Schema's ``integer`` includes it."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(422, "Validation", f"{name} must be an integer >= 1, got {json.dumps(value)}")
    return value


def _sequence(texts: list, index: int) -> tuple[str, str | None]:
    if not 1 <= len(texts) <= 2 or not all(isinstance(text, str) for text in texts):
        raise RequestError(
            422,
            "Validation",
            f"input {index} must be one text or a pair of two texts (strings), got {json.dumps(texts)}",
        )
    if texts[0] == "":
        raise RequestError(400, "Empty", f"input {index} is an empty text; send at least one character")
    return texts[0], (texts[1] if len(texts) == 2 else None)


def format_answer(
    logits: torch.Tensor,
    exit_layer: int,
    layers_run: int,
    id2label: dict,
    raw_scores: bool,
    multi_label: bool = False,
) -> list:
    """One input's answer: ``{"score", "label", "exit_layer", "layers_run"}`` per label, best first.

    ``logits``: [C]. Scores are the softmax; with ``multi_label`` each label's sigmoid
    (independent labels); with ``raw_scores`` the logits. A regression head (C = 1)
    answers its value as the score.
    """
    logits = logits.float()
    if raw_scores or (logits.numel() == 1 and not multi_label):
        scores = logits
    else:
        scores = torch.sigmoid(logits) if multi_label else logits.softmax(-1)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    values = scores.tolist()
    return [
        {"score": values[c], "label": _label(id2label, c), "exit_layer": exit_layer, "layers_run": layers_run}
        for c in order
    ]


def _label(id2label: dict, index: int) -> str:
    return str(id2label.get(index, id2label.get(str(index), f"LABEL_{index}")))
