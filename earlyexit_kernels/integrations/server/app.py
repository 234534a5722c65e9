"""The HTTP app: the routes of :data:`.routes.ROUTES` over the continuous early-exit engine.

The app is Starlette (a small, well-kept ASGI toolkit: no request-model layer to pay
for, and the same app runs under uvicorn or inside Ray Serve). The event loop only
reads bodies and waits: parsing and tokenizing (a long text cut by characters first,
:mod:`.tokenization`) run on worker threads, the layer calls on the
:class:`earlyexit_kernels.engine.entry.background.BackgroundEngine` thread, whose continuous engine
batches the sequences of every request in flight. Each sequence is answered as soon as
it exits; a request is answered when its last sequence has.

Routes, one module per protocol (:mod:`.routes`): ``/predict`` (text-embeddings-inference's shape,
:mod:`.routes.tei`), ``/classify`` and ``/v1/classify`` (Infinity's and vLLM's, :mod:`.routes.infinity`),
``/rerank`` and ``/v1/rerank`` (TEI's reranking shape or Cohere's, :mod:`.routes.cohere`, for one-output
cross-encoders), ``/v2/rerank`` (Cohere's v2), ``/`` (the Hugging Face Inference API's text classification,
what ``huggingface_hub.InferenceClient(base_url=...).text_classification`` sends,
:mod:`.routes.inference_api`), ``/v1/models`` (:mod:`.routes.openai`), ``/models`` (Infinity's), and the
server's own (:mod:`.routes.service`): ``/feedback``, ``/health``, ``/info``, ``/metrics``,
``/openapi.json`` (:mod:`.openapi`) and ``/docs`` (Swagger UI, :mod:`.docs_ui`). Every answer of the POST routes carries
``x-total-time`` (and its TEI alias ``x-compute-time``), ``x-tokenization-time``, ``x-queue-time``,
``x-inference-time`` (split into ``x-layer-time`` and ``x-layer-wait-time``) and ``x-answer-time`` headers (milliseconds, see :class:`.request_costs.RequestCosts`; each answered request's
spans are also the ``eek_request_*_seconds`` histograms at ``/metrics``); every answer at all an ``x-request-id``
(:mod:`.request_id`). Errors, unknown routes and methods included, are JSON
``{"error", "error_type"}`` (:mod:`.errors`). With ``api_key`` every route but ``/health`` needs
``Authorization: Bearer <api_key>`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import sys

from earlyexit_kernels.integrations.server.body_limit import BodyLimitMiddleware
from earlyexit_kernels.integrations.server.errors import http_error_handler
from earlyexit_kernels.integrations.server.heap_freeze import freeze_startup_heap
from earlyexit_kernels.integrations.server.routes import OPEN, ROUTES, handlers
from earlyexit_kernels.integrations.server.routes.handling import guarded
from earlyexit_kernels.integrations.server.serve_settings import ServeSettings
from earlyexit_kernels.integrations.server.serving_state import ServingState

__all__ = ["create_app"]


def create_app(model, tokenizer, settings: ServeSettings | None = None, **options):
    """A Starlette app serving the patched ``model``; the engine starts with the app.

    ``settings``: a :class:`~.serve_settings.ServeSettings` (what ``eek serve`` makes once), or keyword
    ``options`` (``model_id=``, ``max_batch_size=``, ``audit_fraction=``, ...: each field of its groups, the
    audit's prefixed ``audit_``; :meth:`~.serve_settings.ServeSettings.from_options`), not both. The state the routes serve from is a
    :class:`~.serving_state.ServingState` built from them (``app.state.eek``).
    """
    if settings is None:
        settings = ServeSettings.from_options(**options)
    elif options:
        raise TypeError(f"give settings or options, not both: {', '.join(sorted(options))}")
    return _app(ServingState(model, tokenizer, settings))


def _app(state: ServingState):
    """The routes over ``state``."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    from earlyexit_kernels._version import __version__
    from earlyexit_kernels.integrations.server.openapi import openapi_document
    from earlyexit_kernels.integrations.server.request_id import RequestIdMiddleware

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        if state.prepared_line:
            print(state.prepared_line, file=sys.stderr, flush=True)
        if getattr(app.state, "freeze_heap", False):  # set by eek serve and each Ray replica (heap_freeze.py)
            frozen = freeze_startup_heap()
            print(
                f"garbage collector: {frozen} start-up objects frozen (its oldest collections skip them)",
                file=sys.stderr,
                flush=True,
            )
        try:
            yield
        finally:
            # uvicorn gets here after the requests in flight were answered (SIGTERM included).
            await asyncio.to_thread(state.stop)

    document = openapi_document(
        state.model_id,
        version=__version__,
        api_key=state.settings.http.api_key is not None,
        reranks=state.num_labels == 1,
        max_length=state.max_length,
        labels=state.labels,
    )
    by_path = handlers(state, document)
    routes = [
        Route(path, by_path[path] if path in OPEN else guarded(state, by_path[path]), methods=[method])
        for method, path, _ in ROUTES
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # the request id outermost, so that a body refused for its size carries one too
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(BodyLimitMiddleware, max_bytes=state.settings.http.max_body_bytes),
        ],
        exception_handlers={HTTPException: http_error_handler(ROUTES)},
    )
    app.state.eek = state
    return app
