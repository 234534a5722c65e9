"""``POST /``: text classification in the Hugging Face Inference API's shape.

This is what ``huggingface_hub.InferenceClient(base_url=...).text_classification(text)``
sends: ``{"inputs": "...", "parameters": {"function_to_apply": ..., "top_k": ...}}``.
``inputs`` is a text, a list of texts, or ``{"text": "...", "text_pair": "..."}``.
``function_to_apply`` is ``"softmax"``, ``"sigmoid"`` or ``"none"`` (the logits); by
default the model's own: the sigmoid for a multi-label model or a one-output head, the
softmax otherwise. ``top_k`` keeps the best ``k`` labels (default: every label).

Answer: one list per input of ``{"label", "score"}`` (plus ``exit_layer`` and
``layers_run``), highest score first: ``[[...]]`` for a single text.

The request's schema and validation are a pydantic model (:class:`.bodies.InferenceApiRequest`), its
``inputs`` read by :func:`inference_inputs`; here, those and the answer.
"""

from __future__ import annotations

import json

import torch

from earlyexit_kernels.integrations.server.predict_schema import TEXT_SCHEMA, RequestError

__all__ = [
    "FUNCTIONS",
    "INFERENCE_INPUTS_SCHEMA",
    "format_inference_api_answer",
    "inference_inputs",
    "inference_parameters",
]

FUNCTIONS = ("softmax", "sigmoid", "none")

_PAIR = {
    "type": "object",
    "required": ["text"],
    "additionalProperties": False,
    "properties": {"text": TEXT_SCHEMA, "text_pair": {"type": ["string", "null"]}},
}
#: ``inputs``' JSON Schema
INFERENCE_INPUTS_SCHEMA = {
    "anyOf": [TEXT_SCHEMA, _PAIR, {"type": "array", "minItems": 1, "items": {"anyOf": [TEXT_SCHEMA, _PAIR]}}],
    "description": 'a text, a list of texts, or {"text": "...", "text_pair": "..."}',
}


def inference_inputs(inputs) -> list[tuple[str, str | None]]:
    """The Inference API's ``inputs`` -> (text, second text or None) per input; :class:`RequestError` says
    what is wrong."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise RequestError(400, "Empty", "inputs is an empty list; send at least one text")
    return [_sequence(item, index) for index, item in enumerate(items)]


def inference_parameters(parameters) -> dict:
    """The Inference API's ``parameters`` (null: none) checked as an object; its fields are the model's."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(422, "Validation", f"parameters must be a JSON object, got {json.dumps(parameters)}")
    return parameters


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


def format_inference_api_answer(request, finished: list, id2label: dict, multi_label: bool) -> list[list[dict]]:
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
