"""The server's own routes: ``POST /feedback`` (a label for an audited input), ``GET /health``, ``/info``,
``/metrics`` (Prometheus), ``/openapi.json`` and ``/docs`` (Swagger UI over the document, offline, its files
at ``/docs/{asset}``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, create_model

from earlyexit_kernels.integrations.server.docs_ui import ASSETS
from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.routes.handling import refused
from earlyexit_kernels.integrations.server.routes.operations import (
    ANSWER_HEADERS,
    REQUEST_ID_PARAMETER,
    Served,
    errors,
    get,
    ref,
    response,
)
from earlyexit_kernels.integrations.server.routes.shared import whole
from earlyexit_kernels.integrations.server.validation import validated

__all__ = ["FeedbackAnswer", "Health", "Info", "feedback_request_model", "handlers", "operations", "schemas"]

FEEDBACK_SHAPE = '{"request_id": "...", "input": 0, "label": "..."}'


class _FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the answer's x-request-id")
    input: Annotated[int, Strict(), Field(ge=0), BeforeValidator(whole)] = Field(
        0, description="which input of that request, from 0 (a batch's position)"
    )


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


class Health(BaseModel):
    status: Literal["ok"]


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


def handlers(state, document: dict) -> dict:
    """The routes' handlers over ``state`` (a :class:`~..serving_state.ServingState`), by path; ``document``:
    the server's OpenAPI document."""
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from earlyexit_kernels.integrations.server.docs_ui import INSTALL, assets_folder, docs_page

    feedback_model = feedback_request_model(state.labels)

    async def feedback(request):
        try:
            body = await asyncio.to_thread(validated, feedback_model, await request.body(), FEEDBACK_SHAPE, "/feedback")
            if state.feedback is None:
                raise RequestError(404, "NotFound", state.no_feedback)
            answered = state.feedback.label(body.request_id, body.input, body.label)
        except RequestError as error:
            return refused(state, error)
        state.metrics.requests.labels("200").inc()
        return JSONResponse(answered)

    async def health(request):
        if state.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": "the engine is not running", "error_type": "Unhealthy"}, status_code=503)

    async def info(request):
        return JSONResponse(state.info())

    async def metrics(request):
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    async def openapi(request):
        return JSONResponse(document)

    page = docs_page(document["info"]["title"])
    assets = assets_folder()

    async def docs(request):
        return HTMLResponse(page)

    async def docs_asset(request):
        name = request.path_params["asset"]
        if assets is None or name not in ASSETS:
            files = ", ".join(ASSETS) if assets is not None else f"none: Swagger UI is not installed ({INSTALL})"
            return JSONResponse(
                {"error": f"no file {name!r} of Swagger UI here; its files: {files}", "error_type": "NotFound"},
                status_code=404,
            )
        return FileResponse(assets / name, media_type=ASSETS[name])

    return {
        "/feedback": feedback,
        "/health": health,
        "/info": info,
        "/metrics": metrics,
        "/openapi.json": openapi,
        "/docs": docs,
        "/docs/{asset}": docs_asset,
    }


def operations(served: Served) -> dict:
    """The routes' OpenAPI entries, by path."""
    summaries, keyed = served.summaries, served.keyed
    feedback = {
        "post": {
            "summary": summaries["/feedback"],
            "description": "The label of input `input` of the request whose answer carried `x-request-id: "
            "request_id`. Where the audit ran that input through the full model, its accuracy lost against "
            "the full model is counted (`eek_audit_accuracy_*` at /metrics). 404 for a request not among "
            "the last served here, an input it did not have, or a server that keeps no audited inputs (no "
            "audit, or a model that is no single-label classifier).",
            "parameters": [REQUEST_ID_PARAMETER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref("FeedbackRequest")}}},
            "responses": {
                "200": response("whether the label counts", schema=ref("FeedbackAnswer")),
                **errors("400 422" + keyed),
                "404": response(
                    "no such request among the last served, no such input, or no audited inputs kept here",
                    schema=ref("Error"),
                ),
            },
        }
    }
    docs_asset = {
        "get": {
            "summary": summaries["/docs/{asset}"],
            "parameters": [
                {"name": "asset", "in": "path", "required": True, "schema": {"enum": list(ASSETS)}},
                REQUEST_ID_PARAMETER,
            ],
            "security": [],
            "responses": {
                "200": {
                    "description": "the file",
                    "headers": ANSWER_HEADERS,
                    "content": {media: {"schema": {"type": "string"}} for media in sorted(set(ASSETS.values()))},
                },
                "404": response("no such file, or swagger-ui-py is not installed", schema=ref("Error")),
            },
        }
    }
    health = get(summaries["/health"], response("the engine runs", schema=ref("Health")), "503")
    if served.api_key:
        health["get"]["security"] = []  # the one route a client without the key may call
    return {
        "/feedback": feedback,
        "/health": health,
        "/info": get(summaries["/info"], response("the model and the settings", schema=ref("Info")), keyed),
        "/metrics": get(summaries["/metrics"], response("Prometheus' text format", media="text/plain"), keyed),
        "/openapi.json": get(summaries["/openapi.json"], response("OpenAPI 3.1", schema={"type": "object"}), keyed),
        "/docs": get(summaries["/docs"], response("an HTML page", media="text/html"), keyed),
        "/docs/{asset}": docs_asset,
    }


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the routes' bodies (the OpenAPI document's components)."""
    return [Health, Info, FeedbackAnswer, feedback_request_model(served.labels or ["LABEL_0"])]
