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
(:mod:`.openapi`) and ``/docs`` (:mod:`.docs_page`). Every answer of the POST routes carries
``x-total-time`` (and its TEI alias ``x-compute-time``), ``x-tokenization-time``, ``x-queue-time``
and ``x-inference-time`` headers (milliseconds, see :class:`.request_costs.RequestCosts`; each answered request's
spans are also the ``eek_request_*_seconds`` histograms at ``/metrics``); every answer at all an ``x-request-id``
(:mod:`.request_id`). Errors, unknown routes and methods included, are JSON
``{"error", "error_type"}``. With ``api_key`` every route but ``/health`` needs
``Authorization: Bearer <api_key>`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import time

from earlyexit_kernels.engine.background import BackgroundEngine, QueueFull
from earlyexit_kernels.integrations.server.body_limit import (
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    check_max_body_bytes,
)
from earlyexit_kernels.integrations.server.classify_schema import format_classify_answer, parse_classify_request
from earlyexit_kernels.integrations.server.cohere_rerank_schema import (
    CohereRerankRequest,
    cohere_rerank_request_from_body,
    cohere_rerank_v2_request_from_body,
    format_cohere_rerank_answer,
    format_cohere_rerank_v2_answer,
)
from earlyexit_kernels.integrations.server.feedback import FeedbackStore, parse_feedback_request
from earlyexit_kernels.integrations.server.inference_api_schema import (
    format_inference_api_answer,
    parse_inference_api_request,
)
from earlyexit_kernels.integrations.server.predict_schema import (
    RequestError,
    _label,
    format_answer,
    parse_predict_request,
    read_json,
)
from earlyexit_kernels.integrations.server.request_costs import RequestCosts
from earlyexit_kernels.integrations.server.rerank_schema import format_rerank_answer, rerank_request_from_body
from earlyexit_kernels.integrations.server.tokenization import Tokenization
from earlyexit_kernels.patching.patch import backend_of, policy_of

__all__ = ["create_app"]


def create_app(
    model,
    tokenizer,
    *,
    model_id: str = "model",
    max_batch_size: int = 64,
    max_tokens: int | None = None,
    max_queue: int = 1024,
    max_length: int | None = None,
    compile: bool | dict = False,
    api_key: str | None = None,
    max_client_batch_size: int | None = None,
    audit_fraction: float = 0.0,
    audit_budget: float | None = None,
    audit_confidence: float = 0.95,
    audit_seed: int = 0,
    audit_accuracy_budget: float | None = None,
    recertify=None,
    audit_record: str | None = None,
    max_age: int | str | None = "auto",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
):
    """A Starlette app serving the patched ``model``; the engine starts with the app.

    ``max_queue``: most sequences submitted and not finished; a request that does not fit
    gets 429 at once. ``max_client_batch_size``: most inputs (or rerank texts) in one
    request (default ``max_queue``); a bigger request gets 413 naming the limit, a smaller
    one is split over as many layer calls as ``max_batch_size`` needs. ``max_length``:
    most tokens per sequence (default what the model's positions hold); longer texts get
    413 unless the request says ``truncate``. ``api_key``: when given, every route but
    ``/health`` needs ``Authorization: Bearer <api_key>``. ``audit_fraction``: the fraction of
    the sequences, drawn at random (``audit_seed``), that also run through the full model once
    answered, their disagreement with the early exit, its upper ``audit_confidence`` bound and
    ``audit_budget`` (a fraction, or None: no budget, no warning) exported at ``/metrics``
    (``eek_audit_*``); 0, the default, audits nothing (:mod:`earlyexit_kernels.engine.audit`,
    :mod:`.audit_worker`). ``audit_accuracy_budget``: the accuracy lost (a fraction) the labelled audited
    inputs are watched against (labels sent to ``POST /feedback``, :mod:`.feedback`), usually the
    certificate's of a folder certified on accuracy lost; None: the accuracy lost is reported, no
    warning. ``recertify``: an
    :class:`~earlyexit_kernels.training.online_certificate.OnlineCertificate` (needs the audit) that moves
    the served threshold along its certified path from the audited sequences (its moves at
    ``/metrics``, ``eek_policy_*``), or None; ``audit_record``: a file the audited rows of its epoch
    are written to, for ``eek calibrate FOLDER --from-audit``. ``max_age``: bounded waiting, the layer
    calls after which a sequence the engine thread took is served first
    (:mod:`earlyexit_kernels.engine.aging`): ``"auto"`` (default, 2 x the layers), an integer >= 0 (0:
    strictly oldest first) or None (no age rule). ``max_body_bytes``: the largest request body
    taken; a larger one gets 413 before it is read whole (:mod:`.body_limit`, TEI's default of
    2,000,000 bytes). Other options as :class:`earlyexit_kernels.engine.continuous.ContinuousEngine`.
    """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from earlyexit_kernels import __version__
    from earlyexit_kernels.engine.aging import check_max_age
    from earlyexit_kernels.engine.audit import AuditWatch, check_fraction
    from earlyexit_kernels.integrations.server.docs_page import docs_page
    from earlyexit_kernels.integrations.server.openapi import ROUTES, openapi_document
    from earlyexit_kernels.integrations.server.request_id import RequestIdMiddleware
    from earlyexit_kernels.integrations.server.served_model import infinity_models_answer, models_answer

    check_max_body_bytes(max_body_bytes)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if max_client_batch_size is None:
        max_client_batch_size = max_queue
    if (
        not isinstance(max_client_batch_size, int)
        or isinstance(max_client_batch_size, bool)
        or max_client_batch_size < 1
    ):
        raise ValueError(f"max_client_batch_size must be an integer >= 1, got {max_client_batch_size!r}")
    engine_options = dict(
        max_batch_size=max_batch_size, max_tokens=max_tokens, max_length=max_length, compile=compile, admission="fifo"
    )
    engine_options["max_age"] = check_max_age(max_age)
    audit = None
    if check_fraction(audit_fraction) > 0:
        audit = AuditWatch(
            audit_fraction,
            budget=audit_budget,
            confidence=audit_confidence,
            seed=audit_seed,
            accuracy_budget=audit_accuracy_budget,
        )
    if recertify is not None and audit is None:
        raise ValueError("re-certification reads the audit: give an audit fraction above 0 (--audit-fraction 0.05)")
    if audit_record is not None and recertify is None:
        raise ValueError("the audit record holds what re-certification replays: it needs re-certification on")
    state = _ServerState(
        model, tokenizer, model_id, max_queue, max_client_batch_size, engine_options, audit, recertify, audit_record
    )

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            # uvicorn gets here after the requests in flight were answered (SIGTERM included).
            await asyncio.to_thread(state.stop)

    def authorized(request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

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
            if not authorized(request):
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

        return await answer(request, lambda raw: parse_classify_request(raw, state.model_id), formatted)

    def check_reranks():
        if state.num_labels != 1:
            raise RequestError(
                400,
                "Validation",
                f"/rerank needs a cross-encoder with one output (num_labels == 1); this model has "
                f"num_labels={state.num_labels}: use /predict or /classify",
            )

    async def rerank(request):
        def parse(raw):
            check_reranks()
            body = read_json(raw, '{"query": "...", "texts": [...]} or {"query": "...", "documents": [...]}')
            if isinstance(body, dict) and "documents" in body:
                return cohere_rerank_request_from_body(body, state.model_id)
            return rerank_request_from_body(body)

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
            body = read_json(raw, '{"model": "...", "query": "...", "documents": ["...", ...]}')
            return cohere_rerank_v2_request_from_body(body, state.model_id, state.max_length)

        def formatted(parsed, finished, costs):
            return format_cohere_rerank_v2_answer(parsed, finished, request_id=request.state.request_id)

        return await answer(request, parse, formatted)

    async def inference_api(request):
        def formatted(parsed, finished, costs):
            return format_inference_api_answer(parsed, finished, state.id2label, state.multi_label)

        return await answer(request, parse_inference_api_request, formatted)

    async def feedback(request):
        try:
            body = await asyncio.to_thread(parse_feedback_request, await request.body())
            if state.feedback is None:
                raise RequestError(404, "NotFound", state.no_feedback)
            answer = state.feedback.label(body["request_id"], body.get("input", 0), body["label"])
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
        model_id,
        version=__version__,
        api_key=api_key is not None,
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

    async def docs(request):
        return HTMLResponse(docs_page(document))

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
    }
    routes = [
        Route(path, handlers[path] if path == "/health" else guarded(handlers[path]), methods=[method])
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
        middleware=[Middleware(RequestIdMiddleware), Middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)],
        exception_handlers={HTTPException: http_error},
    )
    app.state.eek = state
    return app


class _ServerState:
    """The model, tokenizer, engine thread and metrics behind one app."""

    def __init__(
        self,
        model,
        tokenizer,
        model_id: str,
        max_queue: int,
        max_client_batch_size: int,
        engine_options: dict,
        audit=None,
        certificate=None,
        audit_record: str | None = None,
    ):
        from earlyexit_kernels.engine.continuous import model_max_length
        from earlyexit_kernels.integrations.labels import is_multi_label
        from earlyexit_kernels.integrations.server.metrics import ServerMetrics

        self.model, self.model_id = model.eval(), model_id
        self.max_queue, self.max_client_batch_size = max_queue, max_client_batch_size
        self.engine_options = engine_options
        self.max_length = engine_options["max_length"] or model_max_length(model)
        self.tokenization = Tokenization(tokenizer, self.max_length)
        config = model.config
        self.id2label = config.id2label or {}
        self.num_labels = config.num_labels
        self.multi_label = is_multi_label(config)
        self.labels = [_label(self.id2label, i) for i in range(self.num_labels)]
        self.worker: BackgroundEngine | None = None
        self.accepting = False
        self.audit = audit  # the AuditWatch, or None
        self.certificate, self.audit_record = certificate, audit_record  # online re-certification, or None
        self.auditor = None  # its AuditWorker, while the app runs
        # labels for audited inputs (POST /feedback): single-label classifiers with an audit
        self.feedback, self.no_feedback = None, None
        if audit is None:
            self.no_feedback = "this server audits nothing, so no label can count: serve with --audit-fraction F"
        elif self.multi_label or self.num_labels < 2:
            self.no_feedback = "/feedback takes the labels of a single-label classifier; this model is not one"
        else:
            self.feedback = FeedbackStore(audit, {label: i for i, label in enumerate(self.labels)})
        self.metrics = ServerMetrics(
            config.num_hidden_layers,
            engine_stats=lambda: self.worker.engine.stats,
            queue_depth=lambda: 0 if self.worker is None else self.worker.outstanding,
            audit=audit,
            certificate=certificate,
        )

    def start(self) -> None:
        if self.worker is None:
            self.worker = BackgroundEngine(self.model, max_queue=self.max_queue, **self.engine_options)
            if self.certificate is not None:
                self.worker.set_policy(self.certificate.served_policy)
        if self.audit is not None and self.auditor is None:
            from earlyexit_kernels.integrations.server.audit_worker import AuditWorker

            self.auditor = AuditWorker(
                self.model,
                self.audit,
                multi_label=self.multi_label,
                max_batch_size=self.engine_options["max_batch_size"],
                max_tokens=self.engine_options["max_tokens"],
                max_queue=self.max_queue,
                certificate=self.certificate,
                on_move=self._serve_policy,
                audit_record=self.audit_record,
                feedback=self.feedback,
            )
        self.accepting = True

    def _serve_policy(self, policy) -> None:
        if self.worker is not None:
            self.worker.set_policy(policy)

    def stop(self) -> None:
        self.accepting = False
        if self.worker is not None:
            self.worker.close(drain=True)
        if self.auditor is not None:
            self.auditor.close()
            self.auditor = None

    def healthy(self) -> bool:
        return self.accepting and self.worker is not None and self.worker._thread.is_alive()

    def info(self) -> dict:
        config = self.model.config
        labels = config.id2label or {}
        if self.multi_label:
            kind = "multi_label_classification"
        elif config.num_labels == 1:
            kind = "single_output (regression or reranking: /rerank)"
        else:
            kind = "single_label_classification"
        return {
            "model_id": self.model_id,
            "model_type": config.model_type,
            "architecture": type(self.model).__name__,
            "problem_type": kind,
            "num_layers": config.num_hidden_layers,
            "labels": [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)],
            "policy": repr(policy_of(self.model) if self.certificate is None else self.certificate.served_policy),
            "backend": backend_of(self.model),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "max_batch_size": self.engine_options["max_batch_size"],
            "max_client_batch_size": self.max_client_batch_size,
            "max_tokens": self.engine_options["max_tokens"],
            "max_length": self.max_length,
            "max_queue": self.max_queue,
            "max_age": self._max_age(),
            "audit": None
            if self.audit is None
            else {
                "fraction": self.audit.fraction,
                "budget": self.audit.budget,
                "confidence": self.audit.confidence,
                "accuracy_budget": self.audit.accuracy_budget,
            },
            "recertify": None if self.certificate is None else self.certificate.as_dict(),
        }

    def _max_age(self) -> int | str | None:
        """The age rule's layer calls, as the engine resolved ``"auto"`` (None: no age rule)."""
        if self.worker is None:
            return self.engine_options["max_age"]
        aging = self.worker.engine.scheduler.aging
        return None if aging is None else aging.max_age

    async def run(self, request, http_request, costs: RequestCosts) -> list | None:
        """Each sequence's :class:`Finished` for ``request`` (anything with ``sequences``,
        ``truncate`` and ``truncation_direction``), or None when the client disconnected first
        (its sequences are then dropped). Fills ``costs``."""
        if not self.accepting or self.worker is None:
            raise RequestError(503, "Unhealthy", "the server is shutting down; send the request to another replica")
        count = len(request.sequences)
        if count > self.max_client_batch_size:
            limit = "--max-client-batch-size" if self.max_client_batch_size != self.max_queue else "--max-queue"
            raise RequestError(
                413,
                "Validation",
                f"the request holds {count} inputs; this server takes at most {self.max_client_batch_size} in one "
                f"request ({limit}): split it",
            )
        encoded = await self.tokenization.encode_async(
            request.sequences, request.truncate, getattr(request, "truncation_direction", "Right")
        )
        costs.tokenized = time.perf_counter()
        costs.tokens = sum(len(ids) for ids, _ in encoded)
        try:
            futures = self.worker.submit_many(encoded)
        except QueueFull:
            raise RequestError(
                429, "Overloaded", f"the server's queue is full ({self.max_queue} sequences); retry shortly"
            ) from None
        except RuntimeError:  # closed between the check above and the submit
            raise RequestError(503, "Unhealthy", "the server is shutting down") from None
        answered = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        gone = asyncio.ensure_future(_disconnected(http_request))
        await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not answered.done():
            for future in futures:
                self.worker.cancel(future)
            answered.cancel()
            return None
        gone.cancel()
        try:
            finished = answered.result()
        except Exception as error:  # the engine failed on a step holding these sequences
            raise RequestError(500, "Backend", f"the model failed on this request: {error}") from None
        costs.done = time.perf_counter()
        costs.admitted = min(done.admitted_at for done in finished)
        for done in finished:
            self.metrics.record_sequence(done.exit_layer, done.layers_run)
        if self.auditor is not None:
            # after the answer is settled: the full model's run changes nothing in it and holds nothing up
            chosen = [self.audit.choose() for _ in encoded]
            request_id = http_request.state.request_id if self.feedback is not None else None
            if request_id is not None:
                audited = {i: int(done.logits.argmax()) for i, (done, c) in enumerate(zip(finished, chosen)) if c}
                self.feedback.served(request_id, len(encoded), audited)
            self.auditor.submit(
                [
                    (ids, types, done.logits, None if request_id is None else (request_id, i))
                    for i, ((ids, types), done, audited) in enumerate(zip(encoded, finished, chosen))
                    if audited
                ]
            )
        return finished


async def _disconnected(request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
