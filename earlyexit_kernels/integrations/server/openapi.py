"""The server's OpenAPI 3.1 document (``GET /openapi.json``), assembled from the routes' modules.

Each protocol's module (:mod:`.routes`) writes its routes' entries and names the pydantic models of their
bodies, whose JSON Schemas become the document's components; this module puts them together.
``python_tests/test_server_fuzz.py`` checks the server against this document with a property-based fuzzer.
"""

from __future__ import annotations

from earlyexit_kernels.integrations.server.errors import Error
from earlyexit_kernels.integrations.server.routes import ROUTES, operations, schemas
from earlyexit_kernels.integrations.server.routes.operations import Served
from earlyexit_kernels.integrations.server.validation import component_schemas

__all__ = ["ROUTES", "openapi_document"]


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
    served = Served(
        model_id,
        api_key=api_key,
        reranks=reranks,
        max_length=max_length,
        labels=labels or [],
        summaries={path: summary for _, path, summary in ROUTES},
    )
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "earlyexit_kernels server",
            "version": version,
            "description": f"Early-exit classification of `{model_id}`: each input leaves the encoder at its exit "
            'layer (`exit_layer`, `layers_run` in every answer). Errors are `{"error", "error_type"}`.',
        },
        "paths": operations(served),
        "components": {"schemas": component_schemas([Error, *schemas(served)])},
    }
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
