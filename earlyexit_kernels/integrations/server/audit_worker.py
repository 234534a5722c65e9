"""The server's audit: the full model on the audited sequences, on a thread of its own, after their answers went out.

The app chooses the sequences (:meth:`earlyexit_kernels.engine.entry.audit.AuditWatch.choose`) when a
request arrives and hands each chosen one, with the logits its answer had, to :class:`AuditWorker`
once the request is answered; so no answer waits for the full model and none changes. The
worker takes what is queued (up to 16 x ``max_batch_size`` sequences at a time, run sorted by
length in batches of ``max_batch_size``), runs the full model on it (:func:`earlyexit_kernels.engine.entry.audit.full_depth_logits`: the model's own forward on the
same weights, no copy) and records the losses and the seconds in the watch, which warns.

It shares the device (and on a CPU, the cores) with the engine thread: F of the sequences cost
the full model's time on top of the early exit's. At most ``max_queue`` sequences wait; beyond
that a chosen sequence is not audited and counted as skipped (``eek_audit_skipped_total``), so
a burst neither grows memory nor holds anything up.

With an :class:`~earlyexit_kernels.calibration.online.OnlineCertificate`, the full model's
run records every head's logits too (its all-exits forward) and the certificate replays the path
on them; when it moves, ``on_move`` gets the policy to serve (the app hands it to the engine
thread), and ``audit_record`` (a file) receives the epoch's audited rows every
``RECORD_EVERY`` of them and at the end, for ``eek calibrate FOLDER --from-audit``.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

import torch

from earlyexit_kernels.engine.entry.audit import AuditRunner, AuditWatch

if TYPE_CHECKING:
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings

__all__ = ["RECORD_EVERY", "AuditWorker"]

#: audited rows between two writes of the audit record
RECORD_EVERY = 500

logger = logging.getLogger("earlyexit_kernels.audit")


class AuditWorker:
    """Run the full model on audited sequences on a daemon thread and feed ``watch``.

    ``settings``: the server's :class:`~.serve_settings.ServeSettings`, read for the full model's batches (its
    engine's ``max_batch_size`` and ``max_tokens``), the most sequences waiting (``http.max_queue``) and the
    audit record (``audit_record``). The rest are what the server made at start-up, not settings:
    ``multi_label``: how a loss is counted (:func:`earlyexit_kernels.engine.entry.audit.disagreement`);
    ``certificate``, ``on_move``: online re-certification (module docstring); ``feedback``: a
    :class:`~.feedback.FeedbackStore`, or None.

    ``submit(items)``: ``(input_ids, token_type_ids, early_logits, key)`` per audited sequence, ``key``
    its (request id, input index) for ``feedback``, or None.
    """

    def __init__(
        self,
        model,
        watch: AuditWatch,
        settings: ServeSettings,
        *,
        multi_label: bool,
        certificate=None,
        on_move=None,
        feedback=None,
    ):
        self.model, self.watch, self.multi_label = model, watch, multi_label
        self.feedback = feedback  # a FeedbackStore told the full model's classes, or None
        self.certificate, self.on_move, self.audit_record = certificate, on_move, settings.audit_record
        self._recorded_at = 0  # the certificate's audited rows at the last write of the record
        self.max_queue = settings.http.max_queue
        self.runner = AuditRunner(
            model,
            watch,
            max_batch_size=settings.engine.max_batch_size,
            max_tokens=settings.engine.max_tokens,
            certificate=certificate,
            on_move=on_move,
            multi_label=multi_label,
        )
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # sequences queued or being run
        self._thread = threading.Thread(target=self._loop, name="eek-audit", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Audited sequences queued or being run."""
        return self._waiting

    def submit(self, items: list[tuple]) -> None:
        """Queue ``(input_ids, token_type_ids, early_logits, key)`` per sequence; past ``max_queue`` they are skipped."""
        taken = 0
        with self._lock:
            taken = max(0, min(len(items), self.max_queue - self._waiting))
            self._waiting += taken
        for item in items[:taken]:
            self._queue.put(item)
        if taken < len(items):
            self.watch.skip(len(items) - taken)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop after the batch in progress; what is still queued is dropped (not counted). The audit
        record is written a last time."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._write_record(force=True)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < 16 * self.runner.max_batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._audit(batch)
            except Exception:  # the audit must never take the server down; say why it stopped counting these
                logger.exception(
                    "audit: the full model failed on %d audited sequences; they are not counted", len(batch)
                )
            finally:
                with self._lock:
                    self._waiting -= len(batch)
            if stop:
                return

    def _audit(self, batch: list[tuple]) -> None:
        full = self.runner.full_logits([(ids, types) for ids, types, _, _ in batch])
        early = torch.stack([logits for _, _, logits, _ in batch])
        self.runner.record(self.runner.losses(early, full))
        if self.feedback is not None:
            classes = full.argmax(-1).tolist()
            keyed = [(key, full_class) for (*_, key), full_class in zip(batch, classes) if key is not None]
            self.feedback.full_classes([key for key, _ in keyed], [full_class for _, full_class in keyed])
        if self.certificate is not None:
            self._write_record()

    def _write_record(self, force: bool = False) -> None:
        if self.audit_record is None or self.certificate is None:
            return
        audited = self.certificate.audited
        if audited == self._recorded_at or (not force and audited - self._recorded_at < RECORD_EVERY):
            return
        if self.certificate.epoch_rows == 0:
            return  # nothing kept since a pull-back: the last record stays as written
        try:
            self.certificate.save_audit(self.audit_record)
        except Exception:  # as the audit itself: never the server's end; say why the record is not written
            logger.exception("audit: could not write the audit record to %s", self.audit_record)
        else:
            self._recorded_at = audited
