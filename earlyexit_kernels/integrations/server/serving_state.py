"""The server's state apart from its routes: :class:`ServingState`, built from one
:class:`~.serve_settings.ServeSettings`, which :mod:`.routes`' handlers call.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from earlyexit_kernels.engine.entry.background import BackgroundEngine, QueueFull
from earlyexit_kernels.engine.layers.served_layers import layers_of, prepare_layers
from earlyexit_kernels.integrations.labels import label_name
from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.feedback import FeedbackStore
from earlyexit_kernels.integrations.server.heap_freeze import frozen_objects
from earlyexit_kernels.integrations.server.memory_trim import process_trim_line
from earlyexit_kernels.integrations.server.request_costs import RequestCosts
from earlyexit_kernels.integrations.server.serve_settings import ServeSettings
from earlyexit_kernels.integrations.server.tokenization import Tokenization
from earlyexit_kernels.patching.patch import backend_of, policy_of

__all__ = ["ServingState", "held_certificate"]


def held_certificate(fields: dict | None) -> dict | None:
    """What ``/info`` says of the served threshold's certificate: the risk, its budget, the guarantee and what it
    promises (None where the threshold was not certified)."""
    if not fields:
        return None
    from earlyexit_kernels.calibration.certify import GUARANTEES, guarantee_of

    guarantee = guarantee_of(fields)
    return {
        "risk": fields.get("risk"),
        "budget": fields.get("budget"),
        "guarantee": guarantee,
        "confidence": fields.get("confidence") if guarantee == "probable" else None,
        "promise": GUARANTEES.get(guarantee),
        "rows": fields.get("rows"),
        "certified": fields.get("certified"),
    }


class ServingState:
    """What one app serves, apart from its routes (as TEI's ``Infer`` sits apart from its HTTP
    routes): the model, the tokenisation (:mod:`.tokenization`), the engine thread, the audit and
    its labels (:mod:`.audit_worker`, :mod:`.feedback`) and the metrics, built from one
    :class:`ServeSettings`. :meth:`run` takes a parsed request's sequences to their answers."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        from earlyexit_kernels.engine.entry.audit import AuditWatch
        from earlyexit_kernels.engine.stream.stream_surface import model_max_length
        from earlyexit_kernels.integrations.labels import is_multi_label
        from earlyexit_kernels.integrations.server.metrics import ServerMetrics

        self.settings = settings
        self.started = int(time.time())  # when the server started, as /v1/models and /models say
        self.model, self.model_id = model.eval(), settings.model_id
        self.max_queue, self.max_client_batch_size = settings.http.max_queue, settings.http.max_client_batch_size
        self.engine_config = settings.engine
        self.max_length = self.engine_config.max_length or model_max_length(model)
        self.tokenization = Tokenization(tokenizer, self.max_length)
        config = model.config
        self.id2label = config.id2label or {}
        self.num_labels = config.num_labels
        self.multi_label = is_multi_label(config)
        self.labels = [label_name(config, i) for i in range(self.num_labels)]
        self.worker: BackgroundEngine | None = None
        self.prepared_line: str | None = None  # what start() prepared of the runtime layers, said at start-up
        self.accepting = False
        audit = None if settings.audit is None else AuditWatch(settings.audit)  # the watch of the audit's settings
        self.audit = audit
        self.certificate, self.recertify_said = _online_certificate(settings, model, self.multi_label)
        self.held_certificate = held_certificate(settings.certificate)
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
            certificate=self.certificate,
        )

    def authorized(self, headers) -> bool:
        """Whether a request with ``headers`` may be served: any without an API key, else one that
        sends ``Authorization: Bearer <key>``."""
        key = self.settings.http.api_key
        if key is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def start(self) -> None:
        if self.worker is None:
            # the runtime layers' sessions made here, before the first request, not by the first requests
            began = time.perf_counter()
            prepared = prepare_layers(self.model)
            if prepared:
                self.prepared_line = (
                    f"layers: {prepared} runtime sessions made at start-up in {time.perf_counter() - began:.2f} s, "
                    "before the first request"
                )
            self.worker = BackgroundEngine(self.model, self.engine_config, max_queue=self.max_queue)
            if self.certificate is not None:
                self.worker.set_policy(self.certificate.served_policy)
        if self.audit is not None and self.auditor is None:
            from earlyexit_kernels.integrations.server.audit_worker import AuditWorker

            self.auditor = AuditWorker(
                self.model,
                self.audit,
                self.settings,
                multi_label=self.multi_label,
                certificate=self.certificate,
                on_move=self._serve_policy,
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
        return self.accepting and self.worker is not None and self.worker.alive

    def info(self) -> dict:
        config = self.model.config
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
            "labels": list(self.labels),
            "policy": repr(policy_of(self.model) if self.certificate is None else self.certificate.served_policy),
            "backend": backend_of(self.model),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "layers": layers_of(self.model),
            "max_batch_size": self.engine_config.max_batch_size,
            "max_client_batch_size": self.max_client_batch_size,
            "max_tokens": self.engine_config.max_tokens,
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
            "certificate": self.held_certificate,
            "memory": process_trim_line(),
            "gc_frozen_objects": frozen_objects(),
        }

    def _max_age(self) -> int | str | None:
        """The age rule's layer calls, as the engine resolved ``"auto"`` (None: no age rule)."""
        if self.worker is None:
            return self.engine_config.max_age
        return self.worker.engine.max_age

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
        except RuntimeError:  # closed between the check above and the submit, or the engine thread stopped
            if self.worker.stopped_by is None:
                raise RequestError(503, "Unhealthy", "the server is shutting down") from None
            raise RequestError(
                503, "Unhealthy", "the engine stopped after an error (the server's log says which): restart the server"
            ) from None
        answered = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        gone = asyncio.ensure_future(_disconnected(http_request))
        dropped = True
        try:
            await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
            dropped = not answered.done()
        finally:
            # the client gone, or this handler cancelled (Ray Serve cancels it when the client goes): the
            # engine drops the sequences and nothing waits on the disconnect any longer
            gone.cancel()
            if dropped:
                for future in futures:
                    self.worker.cancel(future)
                answered.cancel()
        if dropped:
            return None
        try:
            finished = answered.result()
        except Exception as error:  # the engine failed on a step holding these sequences
            raise RequestError(500, "Backend", f"the model failed on this request: {error}") from None
        costs.done = time.perf_counter()
        costs.admitted = min(done.admitted_at for done in finished)
        costs.in_calls = max(done.in_calls for done in finished)
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


def _online_certificate(settings: ServeSettings, model, multi_label: bool):
    """``(the online certificate or None, why)`` for ``settings`` (:attr:`ServeSettings.recertify`) on ``model``:
    one given is served as it is (why: None); otherwise decided from the folder's certificate."""
    from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate
    from earlyexit_kernels.integrations.recertify_choice import Recertify

    if not isinstance(settings.recertify, Recertify):  # the certificate given, served as it is
        return settings.recertify, None
    audit = settings.audit
    certificate, why = resolve_online_certificate(
        settings.folder,
        policy_of(model) if settings.folder is not None and settings.recertify is not Recertify.OFF else None,
        settings.recertify.value,
        fraction=0.0 if audit is None else audit.fraction,
        budget=None if audit is None else audit.budget,
        confidence=None if audit is None else audit.confidence,
        multi_label=multi_label,
    )
    if settings.audit_record is not None and certificate is None:
        raise ValueError(f"the audit record (--audit-record) holds what re-certification replays, and it is {why}")
    return certificate, why


async def _disconnected(request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
