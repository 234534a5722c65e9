"""``POST /``: text classification in the Hugging Face Inference API's shape.

This is what ``huggingface_hub.InferenceClient(base_url=...).text_classification(text)``
sends: ``{"inputs": "...", "parameters": {"function_to_apply": ..., "top_k": ...}}``.
``inputs`` is a text, a list of texts, or ``{"text": "...", "text_pair": "..."}``.
``function_to_apply`` is ``"softmax"``, ``"sigmoid"`` or ``"none"`` (the logits); by
default the model's own: the sigmoid for a multi-label model or a one-output head, the
softmax otherwise. ``top_k`` keeps the best ``k`` labels (default: every label).

Answer: one list per input of ``{"label", "score"}`` (plus ``exit_layer`` and
``layers_run``), highest score first: ``[[...]]`` for a single text.

``inputs`` is a union of shapes that JSON Schema states and pydantic's types do not: :func:`inference_inputs`
reads it inside the model.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, StrictBool, WithJsonSchema

from earlyexit_kernels.integrations.labels import name_in
from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.routes.handling import answer
from earlyexit_kernels.integrations.server.routes.operations import Served, post, ref
from earlyexit_kernels.integrations.server.routes.shared import TEXT_SCHEMA, Count, LabelScore
from earlyexit_kernels.integrations.server.validation import checked, refused_by, validated

__all__ = [
    "FUNCTIONS",
    "INFERENCE_INPUTS_SCHEMA",
    "InferenceApiAnswer",
    "InferenceApiRequest",
    "InferenceParameters",
    "format_inference_api_answer",
    "handlers",
    "inference_inputs",
    "inference_parameters",
    "operations",
    "schemas",
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


class InferenceParameters(BaseModel):
    """The Inference API's text classification ``parameters``."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "function_to_apply": '"softmax", "sigmoid", "none" or null',
        "top_k": "an integer >= 1",
        "truncation": "true or false",
    }

    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="default: the model's own"
    )
    top_k: Count | None = Field(None, description="default: every label")
    truncation: StrictBool = False


def _parameters(value):
    """``parameters`` checked by their own model, so that a refusal names the parameter."""
    return checked(InferenceParameters, inference_parameters(value), "parameters: {...} or null", "parameters")


class InferenceApiRequest(BaseModel):
    """What ``huggingface_hub.InferenceClient(base_url=...).text_classification`` sends to ``/``."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {"inputs": "a text or a list of texts", "parameters": "a JSON object"}

    inputs: Annotated[object, BeforeValidator(refused_by(inference_inputs)), WithJsonSchema(INFERENCE_INPUTS_SCHEMA)]
    parameters: Annotated[
        InferenceParameters | None,
        BeforeValidator(refused_by(_parameters)),
        WithJsonSchema({"anyOf": [{"$ref": "#/components/schemas/InferenceParameters"}, {"type": "null"}]}),
    ] = None
    options: object = Field(None, description="accepted and ignored (the Inference API's wait_for_model, use_cache)")

    @property
    def sequences(self) -> list[tuple[str, str | None]]:
        return self.inputs

    @property
    def function_to_apply(self) -> str | None:
        return None if self.parameters is None else self.parameters.function_to_apply

    @property
    def top_k(self) -> int | None:
        return None if self.parameters is None else self.parameters.top_k

    @property
    def truncate(self) -> bool:
        return self.parameters is not None and self.parameters.truncation


class InferenceApiAnswer(RootModel[list[list[LabelScore]]]):
    """One list per input."""


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
                    "label": name_in(id2label, c),
                    "score": values[c],
                    "exit_layer": done.exit_layer,
                    "layers_run": done.layers_run,
                }
                for c in order
            ]
        )
    return answers


def handlers(state) -> dict:
    """The route's handler over ``state`` (a :class:`~..serving_state.ServingState`), by path."""

    def parse(raw):
        return validated(InferenceApiRequest, raw, '{"inputs": "..."}', "/")

    async def inference_api(request):
        def formatted(parsed, finished, costs):
            return format_inference_api_answer(parsed, finished, state.id2label, state.multi_label)

        return await answer(state, request, parse, formatted)

    return {"/": inference_api}


def operations(served: Served) -> dict:
    """The route's OpenAPI entry, by path."""
    entry = post(
        served.summaries["/"],
        "What `huggingface_hub.InferenceClient(base_url=...).text_classification` sends.",
        ref("InferenceApiRequest"),
        ref("InferenceApiAnswer"),
        served.errors,
    )
    return {"/": entry}


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the route's bodies (the OpenAPI document's components)."""
    return [InferenceApiRequest, InferenceParameters, InferenceApiAnswer]
