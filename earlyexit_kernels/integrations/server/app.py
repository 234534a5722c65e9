"""The HTTP app: the routes of :data:`.openapi.ROUTES` over the continuous early-exit engine.

The app is Starlette (a small, well-kept ASGI toolkit: no request-model layer to pay
for, and the same app runs under uvicorn or inside Ray Serve). The event loop only
reads bodies and waits: parsing and tokenizing (a long text cut by characters first,
:mod:`.tokenization`) run on worker threads, the layer calls on the
:class:`earlyexit_kernels.engine.background.BackgroundEngine` thread, whose continuous engine
batches the sequences of every request in flight. Each sequence is answered as soon as
it exits; a request is answered when its last sequence has.

Routes: ``/predict`` (text-embeddings-inference's shape, :mod:`.predict_schema`),
``/classify`` and ``/v1/classify`` (Infinity's and vLLM's, :mod:`.classify_schema`),
``/rerank`` and ``/v1/rerank`` (TEI's reranking shape, :mod:`.rerank_schema`, or Cohere's,
:mod:`.cohere_rerank_schema`, for one-output cross-encoders), ``/`` (the Hugging Face
Inference API's text classification, what
``huggingface_hub.InferenceClient(base_url=...).text_classification`` sends,
:mod:`.inference_api_schema`), ``/v1/models`` (:mod:`.served_model`), ``/openapi.json``
(:mod:`.openapi`) and ``/docs`` (Swagger UI, :mod:`.docs_ui`). Every answer of the POST routes carries
``x-total-time`` (and its TEI alias ``x-compute-time``), ``x-tokenization-time``, ``x-queue-time``
and ``x-inference-time`` headers (milliseconds, see :class:`.request_costs.RequestCosts`; each answered request's
spans are also the ``eek_request_*_seconds`` histograms at ``/metrics``); every answer at all an ``x-request-id``
(:mod:`.request_id`). Errors, unknown routes and methods included, are JSON
``{"error", "error_type"}``. With ``api_key`` every route but ``/health`` needs
``Authorization: Bearer <api_key>`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import time

from earlyexit_kernels.integrations.server.bodies import (
    InferenceApiRequest,
    TeiRerankRequest,
    classify_request_model,
    cohere_rerank_request_model,
    cohere_rerank_v2_request_model,
    feedback_request_model,
    parse_predict_request,
)
from earlyexit_kernels.integrations.server.body_limit import (
    BodyLimitMiddleware,
)
from earlyexit_kernels.integrations.server.classify_schema import format_classify_answer
from earlyexit_kernels.integrations.server.cohere_rerank_schema import (
    CohereRerankRequest,
    cohere_request,
    cohere_v2_request,
    format_cohere_rerank_answer,
    format_cohere_rerank_v2_answer,
)
from earlyexit_kernels.integrations.server.inference_api_schema import format_inference_api_answer
from earlyexit_kernels.integrations.server.predict_schema import (
    RequestError,
    format_answer,
    read_json,
)
from earlyexit_kernels.integrations.server.request_costs import RequestCosts
from earlyexit_kernels.integrations.server.rerank_schema import format_rerank_answer
from earlyexit_kernels.integrations.server.served_model import check_model
from earlyexit_kernels.integrations.server.serving_state import ServeSettings, ServingState
from earlyexit_kernels.integrations.server.validation import checked, validated

__all__ = ["create_app"]

CLASSIFY_SHAPE = '{"input": ["a text", ...]}'
COHERE_SHAPE = '{"model": "...", "query": "...", "documents": ["...", {"text": "..."}, ...]}'
COHERE_V2_SHAPE = '{"model": "...", "query": "...", "documents": ["...", ...]}'
FEEDBACK_SHAPE = '{"request_id": "...", "input": 0, "label": "..."}'

#: the routes that need no API key: the health check, and Swagger UI's public files
OPEN = ("/health", "/docs/{asset}")


def create_app(model, tokenizer, settings: ServeSettings | None = None, **options):
    """A Starlette app serving the patched ``model``; the engine starts with the app.

    ``settings``: a :class:`~.serving_state.ServeSettings` (what ``eek serve`` makes once), or its
    fields as keyword ``options`` (``model_id=``, ``max_batch_size=``, ``audit_fraction=``, ...; each
    described there), not both. The state the routes serve from is a
    :class:`~.serving_state.ServingState` built from them (``app.state.eek``).
    """
    if settings is None:
        settings = ServeSettings(**options)
    elif options:
        raise TypeError(f"give settings or options, not both: {', '.join(sorted(options))}")
    return _app(ServingState(model, tokenizer, settings))


def _app(state: ServingState):
    """The routes over ``state``."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from earlyexit_kernels._version import __version__
    from earlyexit_kernels.integrations.server.docs_ui import ASSETS, INSTALL, assets_folder, docs_page
    from earlyexit_kernels.integrations.server.openapi import ROUTES, openapi_document
    from earlyexit_kernels.integrations.server.request_id import RequestIdMiddleware
    from earlyexit_kernels.integrations.server.served_model import infinity_models_answer, models_answer

    settings = state.settings

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            # uvicorn gets here after the requests in flight were answered (SIGTERM included).
            await asyncio.to_thread(state.stop)

    def unauthorized():
        state.metrics.requests.labels("401").inc()
        return JSONResponse(
            {
                "error": "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "error_type": "Unauthorized",
            },
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )

    def guarded(handler):
        async def route(request):
            if not state.authorized(request.headers):
                return unauthorized()
            return await handler(request)

        return route

    async def answer(request, parse, run):
        """Parse the body, run its sequences, format: the common path of the POST routes.

        ``run(parsed, finished, costs)`` makes the answer's body."""
        costs = RequestCosts(time.perf_counter())
        try:
            # parsed on a worker thread too: a body of megabytes holds up no other request
            parsed = await asyncio.to_thread(parse, await request.body())
            finished = await state.run(parsed, request, costs)
            if finished is None:  # the client went away; nobody reads this
                state.metrics.requests.labels("499").inc()
                return Response(status_code=499)
            body = run(parsed, finished, costs)
        except RequestError as error:
            state.metrics.requests.labels(str(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status, headers=costs.headers())
        state.metrics.requests.labels("200").inc()
        costs.answered = time.perf_counter()
        state.metrics.record_request(costs.spans())
        return JSONResponse(body, headers=costs.headers())

    async def predict(request):
        def formatted(parsed, finished, costs):
            answers = [
                format_answer(
                    done.logits, done.exit_layer, done.layers_run, state.id2label, parsed.raw_scores, state.multi_label
                )
                for done in finished
            ]
            return answers if parsed.batched else answers[0]

        return await answer(request, parse_predict_request, formatted)

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

        return await answer(request, parse, formatted)

    def check_reranks():
        if state.num_labels != 1:
            raise RequestError(
                400,
                "Validation",
                f"/rerank needs a cross-encoder with one output (num_labels == 1); this model has "
                f"num_labels={state.num_labels}: use /predict or /classify",
            )

    cohere_model = cohere_rerank_request_model(state.model_id)
    cohere_v2_model = cohere_rerank_v2_request_model(state.model_id, state.max_length)

    async def rerank(request):
        def parse(raw):
            check_reranks()
            body = read_json(raw, '{"query": "...", "texts": [...]} or {"query": "...", "documents": [...]}')
            if isinstance(body, dict) and "documents" in body:
                return cohere_request(checked(cohere_model, body, COHERE_SHAPE, "Cohere's rerank"), state.model_id)
            return checked(TeiRerankRequest, body, '{"query": "...", "texts": [...]}', "/rerank")

        def formatted(parsed, finished, costs):
            if isinstance(parsed, CohereRerankRequest):
                return format_cohere_rerank_answer(
                    parsed,
                    finished,
                    model_id=state.model_id,
                    request_id=request.state.request_id,
                    tokens=costs.tokens,
                    created=int(time.time()),
                )
            return format_rerank_answer(parsed, finished)

        return await answer(request, parse, formatted)

    async def rerank_v2(request):
        def parse(raw):
            check_reranks()
            parsed = validated(cohere_v2_model, raw, COHERE_V2_SHAPE, "Cohere's v2 rerank")
            return cohere_v2_request(parsed, state.model_id, state.max_length)

        def formatted(parsed, finished, costs):
            return format_cohere_rerank_v2_answer(parsed, finished, request_id=request.state.request_id)

        return await answer(request, parse, formatted)

    async def inference_api(request):
        def formatted(parsed, finished, costs):
            return format_inference_api_answer(parsed, finished, state.id2label, state.multi_label)

        return await answer(
            request, lambda raw: validated(InferenceApiRequest, raw, '{"inputs": "..."}', "/"), formatted
        )

    feedback_model = feedback_request_model(state.labels)

    async def feedback(request):
        try:
            body = await asyncio.to_thread(validated, feedback_model, await request.body(), FEEDBACK_SHAPE, "/feedback")
            if state.feedback is None:
                raise RequestError(404, "NotFound", state.no_feedback)
            answer = state.feedback.label(body.request_id, body.input, body.label)
        except RequestError as error:
            state.metrics.requests.labels(str(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status)
        state.metrics.requests.labels("200").inc()
        return JSONResponse(answer)

    async def health(request):
        if state.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": "the engine is not running", "error_type": "Unhealthy"}, status_code=503)

    async def info(request):
        return JSONResponse(state.info())

    async def metrics(request):
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    started = int(time.time())
    document = openapi_document(
        state.model_id,
        version=__version__,
        api_key=settings.api_key is not None,
        reranks=state.num_labels == 1,
        max_length=state.max_length,
        labels=state.labels,
    )

    async def models(request):
        return JSONResponse(models_answer(state.model_id, started))

    async def infinity_models(request):
        capabilities = ["classify", "rerank"] if state.num_labels == 1 else ["classify"]
        return JSONResponse(infinity_models_answer(state.model_id, started, capabilities))

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

    handlers = {
        "/predict": predict,
        "/classify": classify,
        "/v1/classify": classify,
        "/rerank": rerank,
        "/v1/rerank": rerank,
        "/v2/rerank": rerank_v2,
        "/": inference_api,
        "/feedback": feedback,
        "/v1/models": models,
        "/models": infinity_models,
        "/health": health,
        "/info": info,
        "/metrics": metrics,
        "/openapi.json": openapi,
        "/docs": docs,
        "/docs/{asset}": docs_asset,
    }
    routes = [
        Route(path, handlers[path] if path in OPEN else guarded(handlers[path]), methods=[method])
        for method, path, _ in ROUTES
    ]

    async def http_error(request, error):
        # Starlette's own 404 and 405 (no such route, or not this method), as JSON like every other error
        if error.status_code == 404:
            listed = ", ".join(f"{method} {path}" for method, path, _ in ROUTES)
            message = f"no route {request.url.path}; the routes are {listed} (GET /docs)"
            kind = "NotFound"
        elif error.status_code == 405:
            # Starlette names the header "Allow": read it whatever its case
            allowed = next((v for k, v in (error.headers or {}).items() if k.lower() == "allow"), "")
            message = f"{request.method} is not allowed on {request.url.path}; send {allowed or 'another method'}"
            kind = "MethodNotAllowed"
        else:
            message, kind = str(error.detail), "HTTP"
        return JSONResponse(
            {"error": message, "error_type": kind}, status_code=error.status_code, headers=error.headers
        )

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # the request id outermost, so that a body refused for its size carries one too
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.eek = state
    return app
