"""``POST /``: text classification in the Hugging Face Inference API's shape.

This is what ``huggingface_hub.InferenceClient(base_url=...).text_classification(text)``
sends: ``{"inputs": "...", "parameters": {"function_to_apply": ..., "top_k": ...}}``.
``inputs`` is a text, a list of texts, or ``{"text": "...", "text_pair": "..."}``.
``function_to_apply`` is ``"softmax"``, ``"sigmoid"`` or ``"none"`` (the logits); by
default the model's own: the sigmoid for a multi-label model or a one-output head, the
softmax otherwise. ``top_k`` keeps the best ``k`` labels (default: every label).

Answer: one list per input of ``{"label", "score"}`` (plus ``exit_layer`` and
``layers_run``), highest score first: ``[[...]]`` for a single text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from earlyexit_kernels.integrations.server.predict_schema import (
    TEXT_SCHEMA,
    RequestError,
    count,
    read_json,
)

__all__ = [
    "INFERENCE_API_REQUEST_SCHEMA",
    "InferenceApiRequest",
    "format_inference_api_answer",
    "parse_inference_api_request",
]

FUNCTIONS = ("softmax", "sigmoid", "none")

_PAIR = {
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {"text": TEXT_SCHEMA, "text_pair": {"type": ["string", "null"]}},
}
INFERENCE_API_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "additionalProperties": False,
    "properties": {
        "inputs": {
            "anyOf": [TEXT_SCHEMA, _PAIR, {"type": "array", "minItems": 1, "items": {"anyOf": [TEXT_SCHEMA, _PAIR]}}],
            "description": 'a text, a list of texts, or {"text": "...", "text_pair": "..."}',
        },
        "parameters": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "function_to_apply": {"enum": [*FUNCTIONS, None], "description": "default: the model's own"},
                "top_k": {"type": ["integer", "null"], "minimum": 1, "description": "default: every label"},
                "truncation": {"type": "boolean", "default": False},
            },
        },
        "options": {"description": "accepted and ignored (the Inference API's wait_for_model, use_cache)"},
    },
}


@dataclass(frozen=True)
class InferenceApiRequest:
    sequences: list[tuple[str, str | None]]
    function_to_apply: str | None
    top_k: int | None
    truncate: bool


def parse_inference_api_request(raw: bytes) -> InferenceApiRequest:
    """The request body -> :class:`InferenceApiRequest`; :class:`RequestError` says what is wrong."""
    body = read_json(raw, '{"inputs": "..."}')
    if not isinstance(body, dict) or "inputs" not in body:
        raise RequestError(
            422, "Validation", 'the body must be a JSON object with "inputs" (a text or a list of texts)'
        )
    unknown = sorted(set(body) - {"inputs", "parameters", "options"})
    if unknown:
        raise RequestError(422, "Validation", f"unknown field(s) {', '.join(unknown)}; / takes inputs and parameters")
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise RequestError(422, "Validation", f"parameters must be a JSON object, got {json.dumps(parameters)}")
    unknown = sorted(set(parameters) - {"function_to_apply", "top_k", "truncation"})
    if unknown:
        raise RequestError(
            422,
            "Validation",
            f"unknown parameter(s) {', '.join(unknown)}; text classification takes function_to_apply, top_k",
        )
    function = parameters.get("function_to_apply")
    if function is not None and function not in FUNCTIONS:
        raise RequestError(
            422, "Validation", f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {json.dumps(function)}"
        )
    top_k = count(parameters, "top_k")
    truncate = parameters.get("truncation", False)
    if not isinstance(truncate, bool):
        raise RequestError(422, "Validation", f"truncation must be true or false, got {json.dumps(truncate)}")
    inputs = body["inputs"]
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise RequestError(400, "Empty", "inputs is an empty list; send at least one text")
    sequences = [_sequence(item, index) for index, item in enumerate(items)]
    return InferenceApiRequest(sequences, function, top_k, truncate)


def _sequence(item, index: int) -> tuple[str, str | None]:
    if isinstance(item, dict) and set(item) <= {"text", "text_pair"} and isinstance(item.get("text"), str):
        pair = item.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise RequestError(422, "Validation", f"input {index}: text_pair must be a string")
        text = item["text"]
    elif isinstance(item, str):
        text, pair = item, None
    else:
        raise RequestError(
            422,
            "Validation",
            f'input {index} must be a text or {{"text": "...", "text_pair": "..."}}, got {json.dumps(item)}',
        )
    if not text:
        raise RequestError(400, "Empty", f"input {index} is an empty text; send at least one character")
    return text, pair or None


def format_inference_api_answer(
    request: InferenceApiRequest, finished: list, id2label: dict, multi_label: bool
) -> list[list[dict]]:
    """One list of ``{"label", "score", "exit_layer", "layers_run"}`` per input, best first."""
    answers = []
    for done in finished:
        logits = done.logits.float()
        function = request.function_to_apply
        if function is None:
            function = "sigmoid" if multi_label or logits.numel() == 1 else "softmax"
        if function == "softmax":
            scores = logits.softmax(-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        order = torch.argsort(scores, descending=True, stable=True).tolist()[: request.top_k]
        values = scores.tolist()
        answers.append(
            [
                {
                    "label": str(id2label.get(c, id2label.get(str(c), f"LABEL_{c}"))),
                    "score": values[c],
                    "exit_layer": done.exit_layer,
                    "layers_run": done.layers_run,
                }
                for c in order
            ]
        )
    return answers
