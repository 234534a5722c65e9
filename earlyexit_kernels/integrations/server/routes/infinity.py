"""Infinity's routes: ``POST /classify`` (``/v1/classify`` the same; vLLM's shape too) and ``GET /models``.

``/classify`` request: ``{"model": NAME, "input": "..." | ["...", ...], "raw_scores": false, "truncate":
false}``. ``model`` may be left out (:mod:`..served_model`); ``input`` is one text or a list of texts
(Infinity takes a list, vLLM either); ``raw_scores`` (Infinity's) answers the logits instead of the
probabilities; ``truncate`` cuts a text longer than the model takes (otherwise 413, as ``/predict``);
``user`` (OpenAI's) is accepted and ignored.

Answer (Infinity's ``/classify`` shape)::

    {"object": "classify", "data": [[{"label", "score", "exit_layer", "layers_run"}, ...], ...],
     "model": NAME, "usage": {"prompt_tokens": N, "total_tokens": N}, "id": REQUEST_ID, "created": UNIX_TIME}

one list per input, in input order, every label with its score best first, the scores of
``/predict`` (:func:`.shared.format_answer`). ``usage`` counts the tokens the model read,
special tokens included; ``id`` is the request id (the ``x-request-id`` header). vLLM's own
``/classify`` answers one ``{"index", "label", "probs", "num_classes"}`` per input instead; a
client of it reads the best label as ``data[i][0]["label"]`` here.

``GET /models`` answers in Infinity's shape (``infinity_client`` reads ``stats`` and takes ``owned_by`` to
be ``"infinity"``, so it says that).
"""

from __future__ import annotations

import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema

from earlyexit_kernels.integrations.server.routes.handling import answer
from earlyexit_kernels.integrations.server.routes.openai import ModelEntry, models_answer
from earlyexit_kernels.integrations.server.routes.operations import Served, get, post, ref, response
from earlyexit_kernels.integrations.server.routes.shared import LabelScore, Text, Usage, format_answer, named, usage
from earlyexit_kernels.integrations.server.served_model import check_model
from earlyexit_kernels.integrations.server.validation import validated

__all__ = [
    "ClassifyAnswer",
    "InfinityModels",
    "classify_request_model",
    "format_classify_answer",
    "handlers",
    "infinity_models_answer",
    "operations",
    "schemas",
]

CLASSIFY_SHAPE = '{"input": ["a text", ...]}'


def _listed(value):
    """One text as a list of one (``/classify``'s ``input``)."""
    return [value] if isinstance(value, str) else value


class _ClassifyRequest(BaseModel):
    """Infinity's and vLLM's ``/classify`` body."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "input": "a text or a list of texts",
        "raw_scores": "true or false",
        "truncate": "true or false",
        "user": "a string",
        "model": "a string (the served model's name)",
    }
    ITEM: ClassVar[str] = "{field} {index}"

    input: Annotated[
        list[Text],
        BeforeValidator(_listed),
        Field(min_length=1),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                ]
            }
        ),
    ]
    raw_scores: StrictBool = Field(False, description="the logits instead of probabilities")
    truncate: StrictBool = False
    user: str | None = Field(None, description="accepted and ignored")

    @property
    def sequences(self) -> list[tuple[str, None]]:
        return [(text, None) for text in self.input]


def classify_request_model(model_id: str) -> type[BaseModel]:
    """``/classify``'s body on a server of ``model_id``."""
    return named(_ClassifyRequest, "ClassifyRequest", model_id)


class ClassifyAnswer(BaseModel):
    """Infinity's ``/classify`` answer."""

    object: Literal["classify"]
    data: list[list[LabelScore]] = Field(description="one list per input, in input order")
    model: str
    usage: Usage
    id: str = Field(description="the request id (the x-request-id header)")
    created: int = Field(description="Unix time of the answer")


def format_classify_answer(
    request,
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


class InfinityModelEntry(ModelEntry):
    owned_by: Literal["infinity"] = Field(description="what Infinity's client accepts")
    backend: Literal["earlyexit_kernels"] = "earlyexit_kernels"
    capabilities: list[str] = []
    stats: dict


class InfinityModels(BaseModel):
    """``GET /models``: Infinity's shape (what ``infinity_client``'s ``models`` parses)."""

    object: Literal["list"]
    data: list[InfinityModelEntry]


def infinity_models_answer(model_id: str, created: int, capabilities: list[str]) -> dict:
    """``GET /models``'s answer, in Infinity's shape (what ``infinity_client``'s ``models`` parses)."""
    entry = models_answer(model_id, created)["data"][0]
    entry.update(owned_by="infinity", backend="earlyexit_kernels", capabilities=capabilities, stats={})
    return {"object": "list", "data": [entry]}


def handlers(state) -> dict:
    """The routes' handlers over ``state`` (a :class:`~..serving_state.ServingState`), by path."""
    from starlette.responses import JSONResponse

    classify_model = classify_request_model(state.model_id)

    async def classify(request):
        def formatted(parsed, finished, costs):
            return format_classify_answer(
                parsed,
                finished,
                id2label=state.id2label,
                multi_label=state.multi_label,
                model_id=state.model_id,
                request_id=request.state.request_id,
                tokens=costs.tokens,
                created=int(time.time()),
            )

        def parse(raw):
            parsed = validated(classify_model, raw, CLASSIFY_SHAPE, "/classify")
            check_model({"model": parsed.model}, state.model_id)
            return parsed

        return await answer(state, request, parse, formatted)

    async def models(request):
        capabilities = ["classify", "rerank"] if state.num_labels == 1 else ["classify"]
        return JSONResponse(infinity_models_answer(state.model_id, state.started, capabilities))

    return {"/classify": classify, "/v1/classify": classify, "/models": models}


def operations(served: Served) -> dict:
    """The routes' OpenAPI entries, by path."""
    classify = post(
        served.summaries["/classify"],
        "One list per input of every label with its score, best first, in `data`; `usage` counts the tokens "
        "read. `model` may be left out; another name than the served one gets 404.",
        ref("ClassifyRequest"),
        ref("ClassifyAnswer"),
        served.named_errors,
    )
    models = response("the served model", schema=ref("InfinityModels"))
    return {
        "/classify": classify,
        "/v1/classify": classify,
        "/models": get(served.summaries["/models"], models, served.keyed),
    }


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the routes' bodies (the OpenAPI document's components)."""
    return [ClassifyAnswer, InfinityModels, classify_request_model(served.model_id)]
