"""The pieces of an OpenAPI operation every route's entry is made of: the answers with their headers, the
error answers by status code, a POST or GET operation; and :class:`Served`, what a server's document
depends on (the model's name, its outputs, its labels, whether an API key is needed).

Each protocol's module writes its routes' operations from these (``operations(served)``);
:mod:`..openapi` assembles the document.
"""

from __future__ import annotations

from dataclasses import dataclass

from earlyexit_kernels.integrations.server.request_id import HEADER

__all__ = [
    "Served",
    "always_refused",
    "response",
    "errors",
    "get",
    "post",
    "ref",
    "REQUEST_ID_PARAMETER",
    "ANSWER_HEADERS",
]

ANSWER_HEADERS = {
    HEADER: {
        "description": "the request's X-Request-Id when it sent a usable one (1-128 visible ASCII characters), "
        "else a new id",
        "required": True,
        "schema": {"type": "string"},
    }
}
_MILLISECONDS = {"type": "string", "pattern": "^[0-9]+$"}
# the timing headers of an answered POST request (milliseconds; request_costs.RequestCosts defines each span)
_TIMING_HEADERS = {
    name: {"description": description, "required": True, "schema": _MILLISECONDS}
    for name, description in {
        "x-tokenization-time": "ms from the request's arrival until its texts were tokenized",
        "x-queue-time": "ms from then until the engine admitted the request's first text",
        "x-inference-time": "ms from then until the server held its last text's answer",
        "x-layer-time": "ms of the inference its text longest in layer calls spent in the calls that held it",
        "x-layer-wait-time": "ms of the inference its texts waited for a layer call (x-inference-time less x-layer-time)",
        "x-answer-time": "ms from its last text's answer until its own (handing back, formatting)",
        "x-total-time": "ms from the request's arrival to its answer",
        "x-compute-time": "the same as x-total-time (text-embeddings-inference's name)",
        "x-compute-tokens": "the tokens of the request's texts, special tokens included",
    }.items()
}
REQUEST_ID_PARAMETER = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "echoed in the answer's x-request-id (other values are replaced by a new id)",
    "schema": {"type": "string"},
}
_ERRORS = {
    "400": "not JSON, an empty list or an empty text",
    "401": "a missing or wrong API key",
    "404": "a model name this server does not serve",
    "413": "a text over the model's length without truncate, or more inputs than the server takes in one request",
    "422": "a wrong shape, an unknown field or a value of the wrong type",
    "429": "the queue is full: retry shortly",
    "500": "the model failed on the request",
    "503": "shutting down, or the engine is not running",
}


@dataclass(frozen=True)
class Served:
    """What a server's OpenAPI document depends on: ``model_id``; ``api_key``: every route but ``/health``
    needs ``Authorization: Bearer <key>``; ``reranks``: the model has one output (a cross-encoder),
    otherwise the rerank routes refuse every body with 400 and their operations say so; ``max_length``: the
    tokens the model reads of a sequence; ``labels``: the model's labels; ``summaries``: each route's line
    (:data:`..routes.ROUTES`)."""

    model_id: str
    api_key: bool
    reranks: bool
    max_length: int
    labels: list[str]
    summaries: dict[str, str]

    @property
    def keyed(self) -> str:
        """The status a missing key gets, where a key is needed."""
        return " 401" if self.api_key else ""

    @property
    def errors(self) -> str:
        """The refusals of a POST route that runs the model."""
        return "400 413 422 429 500 503" + self.keyed

    @property
    def named_errors(self) -> str:
        """... and of one whose body may name a model (404 for a name not served)."""
        return self.errors + " 404"


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def response(description: str, media: str = "application/json", schema: dict | None = None) -> dict:
    found = {"description": description, "headers": ANSWER_HEADERS}
    found["content"] = {media: {"schema": schema if schema is not None else {"type": "string"}}}
    return found


def _timed(answered: dict) -> dict:
    """``answered`` with the timing headers besides ``x-request-id``."""
    return {**answered, "headers": {**answered["headers"], **_TIMING_HEADERS}}


def errors(codes: str) -> dict:
    """The answers of the status codes ``codes`` (space-separated), each an ``Error``."""
    return {code: response(_ERRORS[code], schema=ref("Error")) for code in codes.split()}


def always_refused(description: str, codes: str) -> dict:
    """The answers of a route that refuses every request with 400 (``description``), or an error of ``codes``."""
    return {"400": response(description, schema=ref("Error")), **errors(codes)}


def post(summary: str, description: str, request: dict, answered: dict, codes: str) -> dict:
    """A POST operation taking ``request`` and answering ``answered`` (with the timing headers) or an error of
    ``codes``."""
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": [REQUEST_ID_PARAMETER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": _timed(response("the answer", schema=answered)), **errors(codes)},
        }
    }


def get(summary: str, answered: dict, codes: str) -> dict:
    return {
        "get": {
            "summary": summary,
            "parameters": [REQUEST_ID_PARAMETER],
            "responses": {"200": answered, **errors(codes)},
        }
    }
