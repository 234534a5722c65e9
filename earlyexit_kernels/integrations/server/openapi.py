"""The server's OpenAPI 3.1 document (``GET /openapi.json``), assembled from the shape modules.

The JSON Schemas of the bodies written as pydantic models are generated from them (:mod:`.bodies`);
the others live beside the parser that enforces them (:mod:`.predict_schema`,
:mod:`.rerank_schema`, :mod:`.cohere_rerank_schema`, :mod:`.inference_api_schema`,
:mod:`.classify_schema`); this module only says which route takes and
answers which, and with which status codes. ``python_tests/test_server_fuzz.py`` checks the
server against this document with a property-based fuzzer. ``ROUTES`` is every route with a
line on it: the app's routes, ``eek serve --help`` and the documents are tested against it.
"""

from __future__ import annotations

from earlyexit_kernels.integrations.server.bodies import (
    ANSWERS,
    InferenceApiRequest,
    InferenceParameters,
    PredictRequest,
    TeiRerankRequest,
    classify_request_model,
    cohere_rerank_request_model,
    cohere_rerank_v2_request_model,
    feedback_request_model,
)
from earlyexit_kernels.integrations.server.docs_ui import ASSETS
from earlyexit_kernels.integrations.server.request_id import HEADER
from earlyexit_kernels.integrations.server.validation import component_schemas

__all__ = ["ROUTES", "openapi_document"]

#: (method, path, what it does): every route the server has
ROUTES = [
    ("POST", "/predict", "classify, in text-embeddings-inference's /predict shapes"),
    ("POST", "/classify", "classify, in Infinity's and vLLM's shape ({model, input} -> {object: classify, data})"),
    ("POST", "/v1/classify", "the same as /classify"),
    ("POST", "/rerank", "rank documents for a query (one-output models), in TEI's shape or Cohere's"),
    ("POST", "/v1/rerank", "the same as /rerank"),
    ("POST", "/v2/rerank", "rank documents for a query (one-output models), in Cohere's v2 shape (cohere.ClientV2)"),
    ("POST", "/", "the Hugging Face Inference API's text classification"),
    ("POST", "/feedback", "the label of an input the audit ran through the full model: accuracy lost watched"),
    ("GET", "/v1/models", "the served model, in OpenAI's shape"),
    ("GET", "/models", "the served model, in Infinity's shape (infinity_client)"),
    ("GET", "/health", "200 while the engine runs, 503 otherwise"),
    ("GET", "/info", "the model and the server's settings"),
    ("GET", "/metrics", "Prometheus metrics"),
    ("GET", "/openapi.json", "this OpenAPI document"),
    ("GET", "/docs", "Swagger UI over this document, to read and try the routes in a browser (offline)"),
    ("GET", "/docs/{asset}", "Swagger UI's files for /docs, from the swagger-ui-py package (no API key)"),
]

_ANSWER_HEADERS = {
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
        "x-total-time": "ms from the request's arrival to its answer",
        "x-compute-time": "the same as x-total-time (text-embeddings-inference's name)",
        "x-compute-tokens": "the tokens of the request's texts, special tokens included",
    }.items()
}
_REQUEST_ID_PARAMETER = {
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


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, media: str = "application/json", schema: dict | None = None) -> dict:
    answer = {"description": description, "headers": _ANSWER_HEADERS}
    answer["content"] = {media: {"schema": schema if schema is not None else {"type": "string"}}}
    return answer


def _timed(answer: dict) -> dict:
    """``answer`` with the timing headers besides ``x-request-id``."""
    return {**answer, "headers": {**answer["headers"], **_TIMING_HEADERS}}


def _errors(codes: str) -> dict:
    """The answers of the status codes ``codes`` (space-separated), each an :data:`ERROR_SCHEMA`."""
    return {code: _answer(_ERRORS[code], schema=_ref("Error")) for code in codes.split()}


def _post(summary: str, description: str, request: dict, answer: dict, errors: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": [_REQUEST_ID_PARAMETER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": _timed(_answer("the answer", schema=answer)), **_errors(errors)},
        }
    }


def _get(summary: str, answer: dict, errors: str) -> dict:
    return {
        "get": {
            "summary": summary,
            "parameters": [_REQUEST_ID_PARAMETER],
            "responses": {"200": answer, **_errors(errors)},
        }
    }


def openapi_document(
    model_id: str,
    *,
    version: str,
    api_key: bool,
    reranks: bool,
    max_length: int = 512,
    labels: list[str] | None = None,
) -> dict:
    """The OpenAPI document of a server of ``model_id``; with ``api_key`` every route but ``/health``
    needs ``Authorization: Bearer <key>``; ``reranks``: the model has one output (a cross-encoder),
    otherwise ``/rerank`` refuses every body with 400 and its operations say so; ``max_length``: the
    tokens the model reads of a sequence (the least ``max_tokens_per_doc`` of ``/v2/rerank``); ``labels``:
    the model's labels, what ``/feedback`` takes."""
    keyed = " 401" if api_key else ""
    errors = "400 413 422 429 500 503" + keyed
    named_errors = errors + " 404"
    summaries = {path: summary for _, path, summary in ROUTES}
    rerank = _post(
        summaries["/rerank"],
        "A body with `texts` is text-embeddings-inference's shape and gets its answer (a list); one with "
        "`documents` is Cohere's and gets Cohere's answer (`results`). The model must have one output "
        "(a cross-encoder), otherwise 400.",
        {"oneOf": [_ref("TeiRerankRequest"), _ref("CohereRerankRequest")]},
        {"oneOf": [_ref("TeiRerankAnswer"), _ref("CohereRerankAnswer")]},
        named_errors,
    )
    if not reranks:
        operation = rerank["post"]
        operation["description"] = (
            "This server's model has more than one output: every request gets 400 saying to use /classify "
            "or /predict. " + operation["description"]
        )
        operation["responses"] = {
            "400": _answer("every request: the model is no cross-encoder", schema=_ref("Error")),
            **_errors(keyed),
        }
    rerank_v2 = _post(
        summaries["/v2/rerank"],
        "What `cohere.ClientV2(base_url=...).rerank(model=..., query=..., documents=[...])` sends. Documents "
        "are texts; a query and document past the model's length are cut there (as Cohere cuts them), so "
        "`max_tokens_per_doc` below that length gets 422. The model must have one output, otherwise 400.",
        _ref("CohereRerankV2Request"),
        _ref("CohereRerankV2Answer"),
        named_errors,
    )
    if not reranks:
        rerank_v2["post"]["responses"] = rerank["post"]["responses"]
    classify = _post(
        summaries["/classify"],
        "One list per input of every label with its score, best first, in `data`; `usage` counts the tokens "
        "read. `model` may be left out; another name than the served one gets 404.",
        _ref("ClassifyRequest"),
        _ref("ClassifyAnswer"),
        named_errors,
    )
    paths = {
        "/predict": _post(
            summaries["/predict"],
            "`inputs`: a text, a pair of two texts (one input read as a pair, not a batch of two), or a batch "
            "of lists of one or two texts. One input gets a list of every label with its score, best first; a "
            "batch one such list per input.",
            _ref("PredictRequest"),
            _ref("PredictAnswer"),
            errors,
        ),
        "/classify": classify,
        "/v1/classify": classify,
        "/rerank": rerank,
        "/v1/rerank": rerank,
        "/v2/rerank": rerank_v2,
        "/": _post(
            summaries["/"],
            "What `huggingface_hub.InferenceClient(base_url=...).text_classification` sends.",
            _ref("InferenceApiRequest"),
            _ref("InferenceApiAnswer"),
            errors,
        ),
        "/feedback": {
            "post": {
                "summary": summaries["/feedback"],
                "description": "The label of input `input` of the request whose answer carried `x-request-id: "
                "request_id`. Where the audit ran that input through the full model, its accuracy lost against "
                "the full model is counted (`eek_audit_accuracy_*` at /metrics). 404 for a request not among "
                "the last served here, an input it did not have, or a server that keeps no audited inputs (no "
                "audit, or a model that is no single-label classifier).",
                "parameters": [_REQUEST_ID_PARAMETER],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("FeedbackRequest")}}},
                "responses": {
                    "200": _answer("whether the label counts", schema=_ref("FeedbackAnswer")),
                    **_errors("400 422" + keyed),
                    "404": _answer(
                        "no such request among the last served, no such input, or no audited inputs kept here",
                        schema=_ref("Error"),
                    ),
                },
            }
        },
        "/v1/models": _get(summaries["/v1/models"], _answer("the served model", schema=_ref("Models")), keyed),
        "/models": _get(summaries["/models"], _answer("the served model", schema=_ref("InfinityModels")), keyed),
        "/health": _get(summaries["/health"], _answer("the engine runs", schema=_ref("Health")), "503"),
        "/info": _get(summaries["/info"], _answer("the model and the settings", schema=_ref("Info")), keyed),
        "/metrics": _get(summaries["/metrics"], _answer("Prometheus' text format", media="text/plain"), keyed),
        "/openapi.json": _get(summaries["/openapi.json"], _answer("OpenAPI 3.1", schema={"type": "object"}), keyed),
        "/docs": _get(summaries["/docs"], _answer("an HTML page", media="text/html"), keyed),
        "/docs/{asset}": {
            "get": {
                "summary": summaries["/docs/{asset}"],
                "parameters": [
                    {"name": "asset", "in": "path", "required": True, "schema": {"enum": list(ASSETS)}},
                    _REQUEST_ID_PARAMETER,
                ],
                "security": [],
                "responses": {
                    "200": {
                        "description": "the file",
                        "headers": _ANSWER_HEADERS,
                        "content": {media: {"schema": {"type": "string"}} for media in sorted(set(ASSETS.values()))},
                    },
                    "404": _answer("no such file, or swagger-ui-py is not installed", schema=_ref("Error")),
                },
            }
        },
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "earlyexit_kernels server",
            "version": version,
            "description": f"Early-exit classification of `{model_id}`: each input leaves the encoder at its exit "
            'layer (`exit_layer`, `layers_run` in every answer). Errors are `{"error", "error_type"}`.',
        },
        "paths": paths,
        "components": {
            "schemas": {
                **component_schemas(
                    [
                        *ANSWERS,
                        PredictRequest,
                        InferenceApiRequest,
                        InferenceParameters,
                        TeiRerankRequest,
                        classify_request_model(model_id),
                        cohere_rerank_request_model(model_id),
                        cohere_rerank_v2_request_model(model_id, max_length),
                        feedback_request_model(labels or ["LABEL_0"]),
                    ]
                ),
            }
        },
    }
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        paths["/health"]["get"]["security"] = []
    return document
