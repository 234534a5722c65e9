"""The server's routes, one module per protocol, each holding its request and answer models, its
formatter, its handlers and its OpenAPI entries:

- :mod:`.tei`: text-embeddings-inference's ``/predict`` and ``/rerank`` (``/v1/rerank``);
- :mod:`.infinity`: Infinity's (and vLLM's) ``/classify`` (``/v1/classify``) and ``/models``;
- :mod:`.cohere`: Cohere's rerank shapes, v1 (a ``/rerank`` body with ``documents``) and ``/v2/rerank``;
- :mod:`.openai`: OpenAI's ``/v1/models``;
- :mod:`.inference_api`: the Hugging Face Inference API's ``/``;
- :mod:`.service`: the server's own ``/feedback``, ``/health``, ``/info``, ``/metrics``, ``/openapi.json``
  and ``/docs``.

What they share: :mod:`.shared` (bodies), :mod:`.operations` (OpenAPI entries), :mod:`.handling` (the API
key and the common path of the POST routes). :data:`ROUTES` is every route with a line on it: the app's
routes, ``eek serve --help`` and the documents are tested against it.
"""

from __future__ import annotations

from earlyexit_kernels.integrations.server.routes import cohere, inference_api, infinity, openai, service, tei
from earlyexit_kernels.integrations.server.routes.operations import Served

__all__ = ["PROTOCOLS", "ROUTES", "handlers", "operations", "schemas"]

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
#: the routes that need no API key: the health check, and Swagger UI's public files
OPEN = ("/health", "/docs/{asset}")
#: the modules of the protocols served (the server's own routes, :mod:`.service`, come after them)
PROTOCOLS = (tei, infinity, cohere, openai, inference_api)


def handlers(state, document: dict) -> dict:
    """Every route's handler over ``state`` (a :class:`~..serving_state.ServingState`), by path; ``document``:
    the OpenAPI document ``/openapi.json`` answers."""
    found = {}
    for protocol in PROTOCOLS:
        found.update(protocol.handlers(state))
    found.update(service.handlers(state, document))
    return found


def operations(served: Served) -> dict:
    """Every route's OpenAPI entry, in :data:`ROUTES`' order."""
    found = {}
    for protocol in (*PROTOCOLS, service):
        found.update(protocol.operations(served))
    return {path: found[path] for _, path, _ in ROUTES}


def schemas(served: Served) -> list:
    """The models of every route's bodies (the OpenAPI document's components)."""
    return [model for protocol in (*PROTOCOLS, service) for model in protocol.schemas(served)]
