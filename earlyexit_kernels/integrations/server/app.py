"""The HTTP app: ``POST /predict``, ``GET /health``, ``GET /info``, ``GET /metrics``.

The app is Starlette (a small, well-kept ASGI toolkit: no request-model layer to pay
for, and the same app runs under uvicorn or inside Ray Serve). The event loop only
parses, tokenizes (in a worker thread) and waits: the layer calls run on the
:class:`earlyexit_kernels.engine.background.BackgroundEngine` thread, whose continuous engine
batches the sequences of every request in flight. Each sequence is answered as soon as
it exits; a request is answered when its last sequence has.
"""

from __future__ import annotations

import asyncio
import time

from earlyexit_kernels.engine.background import BackgroundEngine, QueueFull
from earlyexit_kernels.integrations.server.predict_schema import (
    PredictRequest,
    RequestError,
    format_answer,
    parse_predict_request,
)

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
):
    """A Starlette app serving the patched ``model``; the engine starts with the app.

    ``max_queue``: most sequences submitted and not finished; a request that does not fit
    gets 429 at once. ``max_length``: most tokens per sequence (default what the model's
    positions hold); longer texts get 413 unless the request says ``truncate``. Other
    options as :class:`earlyexit_kernels.engine.continuous.ContinuousEngine`.
    """
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    engine_options = dict(
        max_batch_size=max_batch_size, max_tokens=max_tokens, max_length=max_length, compile=compile, admission="fifo"
    )
    state = _ServerState(model, tokenizer, model_id, max_queue, engine_options)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            # uvicorn gets here after the requests in flight were answered (SIGTERM included).
            await asyncio.to_thread(state.stop)

    async def predict(request):
        started = time.perf_counter()
        try:
            parsed = parse_predict_request(await request.body())
            answers = await state.predict(parsed, request)
        except RequestError as error:
            state.metrics.requests.labels(str(error.status)).inc()
            return JSONResponse(error.body(), status_code=error.status)
        if answers is None:  # the client went away; nobody reads this
            state.metrics.requests.labels("499").inc()
            return Response(status_code=499)
        state.metrics.requests.labels("200").inc()
        state.metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(answers if parsed.batched else answers[0])

    async def health(request):
        if state.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"error": "the engine is not running", "error_type": "Unhealthy"}, status_code=503)

    async def info(request):
        return JSONResponse(state.info())

    async def metrics(request):
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.eek = state
    return app


class _ServerState:
    """The model, tokenizer, engine thread and metrics behind one app."""

    def __init__(self, model, tokenizer, model_id: str, max_queue: int, engine_options: dict):
        from earlyexit_kernels.engine.continuous import model_max_length
        from earlyexit_kernels.integrations.server.metrics import ServerMetrics

        if tokenizer is None:
            raise ValueError("the server needs the model's tokenizer")
        self.model, self.tokenizer, self.model_id = model.eval(), tokenizer, model_id
        self.max_queue, self.engine_options = max_queue, engine_options
        self.max_length = engine_options["max_length"] or model_max_length(model)
        self.worker: BackgroundEngine | None = None
        self.accepting = False
        self.metrics = ServerMetrics(
            model.config.num_hidden_layers,
            engine_stats=lambda: self.worker.engine.stats,
            queue_depth=lambda: 0 if self.worker is None else self.worker.outstanding,
        )

    def start(self) -> None:
        if self.worker is None:
            self.worker = BackgroundEngine(self.model, max_queue=self.max_queue, **self.engine_options)
        self.accepting = True

    def stop(self) -> None:
        self.accepting = False
        if self.worker is not None:
            self.worker.close(drain=True)

    def healthy(self) -> bool:
        return self.accepting and self.worker is not None and self.worker._thread.is_alive()

    def info(self) -> dict:
        config = self.model.config
        labels = config.id2label or {}
        return {
            "model_id": self.model_id,
            "model_type": config.model_type,
            "architecture": type(self.model).__name__,
            "num_layers": config.num_hidden_layers,
            "labels": [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)],
            "policy": repr(self.model._eek_policy),
            "backend": self.model._eek_backend,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "max_batch_size": self.engine_options["max_batch_size"],
            "max_tokens": self.engine_options["max_tokens"],
            "max_length": self.max_length,
            "max_queue": self.max_queue,
        }

    async def predict(self, request: PredictRequest, http_request) -> list | None:
        """Each input's answer, or None when the client disconnected first (its sequences are dropped)."""
        if not self.accepting or self.worker is None:
            raise RequestError(503, "Unhealthy", "the server is shutting down; send the request to another replica")
        if len(request.sequences) > self.max_queue:
            raise RequestError(
                413,
                "Validation",
                f"the request holds {len(request.sequences)} inputs; this server takes at most "
                f"{self.max_queue} at a time (--max-queue): split it",
            )
        encoded = await asyncio.to_thread(self._tokenize, request)
        futures = []
        try:
            for ids, types in encoded:
                futures.append(self.worker.submit(ids, types))
        except QueueFull:
            for future in futures:
                self.worker.cancel(future)
            raise RequestError(
                429, "Overloaded", f"the server's queue is full ({self.max_queue} sequences); retry shortly"
            ) from None
        except RuntimeError:  # closed between the check above and the submit
            for future in futures:
                self.worker.cancel(future)
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
        labels = self.model.config.id2label or {}
        answers = []
        for done in finished:
            self.metrics.record_sequence(done.exit_layer, done.layers_run)
            answers.append(format_answer(done.logits, done.exit_layer, done.layers_run, labels, request.raw_scores))
        return answers

    def _tokenize(self, request: PredictRequest) -> list[tuple[list[int], list[int] | None]]:
        encoded = []
        for index, (text, pair) in enumerate(request.sequences):
            tokens = self.tokenizer(text, pair, truncation=request.truncate, max_length=self.max_length)
            ids = tokens["input_ids"]
            if len(ids) > self.max_length:
                raise RequestError(
                    413,
                    "Validation",
                    f"input {index} has {len(ids)} tokens; the model takes at most {self.max_length}: "
                    f'shorten it or send "truncate": true',
                )
            encoded.append((ids, tokens.get("token_type_ids")))
        return encoded


async def _disconnected(request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
