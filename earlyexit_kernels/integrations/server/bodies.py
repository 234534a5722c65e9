"""Bodies of the server's routes as pydantic models: their JSON Schemas in the OpenAPI document are generated
from these, and ``POST /feedback``'s body is validated by its model.

So far: the error body, ``/health``, ``/info``, ``/v1/models`` and ``/models`` (OpenAI's and Infinity's
shapes), and ``/feedback``'s request and answer. The classification and reranking routes' bodies are
still the hand-written schemas and parsers of the ``*_schema`` modules, whose messages name what to
change for each shape (``wrap each text in a list`` ...).

:func:`validated` reads a body as the hand-written parsers do (400 for a body that is not JSON) and
validates it with a model; a :class:`pydantic.ValidationError` becomes the server's 422
``{"error", "error_type": "Validation"}``, one clause per field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import models_json_schema

from earlyexit_kernels.integrations.server.predict_schema import RequestError, read_json

__all__ = [
    "Error",
    "FeedbackAnswer",
    "Health",
    "Info",
    "InfinityModels",
    "Models",
    "component_schemas",
    "feedback_request_model",
    "validated",
]


class Error(BaseModel):
    error: str = Field(description="what is wrong and what to change")
    error_type: str = Field(examples=["Validation", "Empty", "NotFound", "Overloaded"])


class Health(BaseModel):
    status: Literal["ok"]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when the server started (Unix time)")
    owned_by: str


class Models(BaseModel):
    """``GET /v1/models``: OpenAI's shape."""

    object: Literal["list"]
    data: list[ModelEntry]


class InfinityModelEntry(ModelEntry):
    owned_by: Literal["infinity"] = Field(description="what Infinity's client accepts")
    backend: Literal["earlyexit_kernels"] = "earlyexit_kernels"
    capabilities: list[str] = []
    stats: dict


class InfinityModels(BaseModel):
    """``GET /models``: Infinity's shape (what ``infinity_client``'s ``models`` parses)."""

    object: Literal["list"]
    data: list[InfinityModelEntry]


class Info(BaseModel):
    """``GET /info``: the model and the server's settings."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str = Field(description="the served model's name (GET /v1/models)")
    model_type: str
    architecture: str = ""
    problem_type: str = ""
    num_layers: int
    labels: list[str]
    policy: str
    backend: str = ""
    dtype: str = ""
    max_batch_size: int = 0
    max_client_batch_size: int = 0
    max_tokens: int | None = None
    max_length: int
    max_queue: int = 0
    max_age: int | None = Field(
        None, description="bounded waiting: layer calls after which a sequence is served first (null: no age rule)"
    )
    audit: dict | None = None
    recertify: dict | None = Field(
        None, description="online re-certification: the policy served, its path index, epoch and moves (null: off)"
    )


class _FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the answer's x-request-id")
    input: int = Field(0, ge=0, description="which input of that request, from 0 (a batch's position)")


def feedback_request_model(labels: list[str]) -> type[BaseModel]:
    """``POST /feedback``'s body on a server whose model has ``labels``: ``label`` is one of them."""
    return create_model(
        "FeedbackRequest",
        __base__=_FeedbackRequest,
        label=(Literal[tuple(labels)], Field(description="the input's true label")),
    )


class FeedbackAnswer(BaseModel):
    request_id: str
    input: int
    audited: bool = Field(description="whether the audit ran this input through the full model")
    counted: bool = Field(description="whether the label counts on the accuracy lost")
    note: str = Field("", description="why it does not count")


def validated(model: type[BaseModel], raw: bytes, send: str) -> BaseModel:
    """``raw`` read as JSON (400 saying to ``send`` the route's shape when it is not) and validated by
    ``model``; 422 naming each field that is wrong and why."""
    body = read_json(raw, send)
    try:
        return model.model_validate(body)
    except ValidationError as error:
        clauses = []
        for problem in error.errors(include_url=False):
            where = ".".join(str(part) for part in problem["loc"]) or "the body"
            if problem["type"] == "extra_forbidden":
                clauses.append(f"unknown field {where}")
            else:
                clauses.append(f"{where}: {problem['msg']}")
        takes = ", ".join(model.model_fields)
        raise RequestError(422, "Validation", f"{'; '.join(clauses)} (the body takes {takes}; send {send})") from None


def component_schemas(models: list[type[BaseModel]]) -> dict:
    """The JSON Schemas of ``models`` and of the models they hold, by class name, as OpenAPI components."""
    _, schemas = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return schemas.get("$defs", {})
