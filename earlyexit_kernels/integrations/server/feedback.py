"""Labels for audited rows: ``POST /feedback``, so that a folder certified on accuracy lost is watched on accuracy lost.

The audit runs a random fraction of the served inputs through the full model too
(:mod:`earlyexit_kernels.engine.entry.audit`). Without labels it can only count disagreement, which a
certificate on accuracy lost does not bound. A client that learns an input's label later (a
reviewer, a click, a ticket's outcome) sends it::

    POST /feedback {"request_id": "<the answer's x-request-id>", "input": 0, "label": "pos"}

Where that input was audited, its paired accuracy loss (the exit wrong where the full model was
right: 1, the reverse: -1, else 0) is counted by the watch (``eek_audit_accuracy_*`` at
``/metrics``) once the full model has run on it. The answer says whether the input was audited
(``"audited"``) and so counted; an input not audited is not counted (the audited inputs are the
uniform sample; counting others would need the full model on them). A label sent again for the
same input is not counted twice.

:class:`FeedbackStore` keeps, for the last ``capacity`` requests served (10,000 by default), how many
inputs each had and, for each audited input, the early exit's class and, once run, the full
model's: a few integers per request. A request older than that, or an id never served, gets 404.
Labels are taken for single-label classifiers (the certificate's accuracy is a class's); other
models' servers answer ``/feedback`` with 404 saying so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from earlyexit_kernels.calibration.row_losses import paired_loss
from earlyexit_kernels.engine.entry.audit import AuditWatch
from earlyexit_kernels.integrations.server.errors import RequestError

__all__ = ["DEFAULT_CAPACITY", "FeedbackStore"]

#: requests whose audited inputs are kept for labels
DEFAULT_CAPACITY = 10_000


class _Row:
    __slots__ = ("early", "full", "label")

    def __init__(self, early: int):
        self.early, self.full, self.label = early, None, None


class FeedbackStore:
    """Audited inputs by (request id, input index) awaiting labels; counts each labelled one in ``watch``."""

    def __init__(self, watch: AuditWatch, label2id: dict[str, int], capacity: int | None = None):
        self.watch, self.label2id = watch, dict(label2id)
        self.capacity = DEFAULT_CAPACITY if capacity is None else capacity
        self._requests: OrderedDict[str, tuple[int, dict[int, _Row]]] = OrderedDict()
        self._lock = threading.Lock()

    def served(self, request_id: str, inputs: int, audited: dict[int, int]) -> None:
        """A request of ``inputs`` inputs was answered; ``audited``: input index -> the early exit's class."""
        with self._lock:
            self._requests[request_id] = (inputs, {index: _Row(early) for index, early in audited.items()})
            self._requests.move_to_end(request_id)
            while len(self._requests) > self.capacity:
                self._requests.popitem(last=False)

    def full_classes(self, keys: list[tuple[str, int]], classes: list[int]) -> None:
        """The full model's classes of the audited inputs ``keys``; those already labelled are counted now."""
        losses = []
        with self._lock:
            for (request_id, index), full in zip(keys, classes, strict=True):
                row = self._row(request_id, index)
                if row is None or row.full is not None:
                    continue
                row.full = full
                if row.label is not None:
                    losses.append(paired_loss(row.early == row.label, full == row.label))
        self.watch.record_labelled(losses)

    def label(self, request_id: str, index: int, label: str) -> dict:
        """Take ``label`` for input ``index`` of request ``request_id``: the answer of ``POST /feedback``."""
        if label not in self.label2id:
            raise RequestError(
                422, "Validation", f"label {label!r} is not one of this model's labels: {', '.join(self.label2id)}"
            )
        with self._lock:
            kept = self._requests.get(request_id)
            if kept is None:
                raise RequestError(
                    404,
                    "NotFound",
                    f"no request {request_id!r} among the last {self.capacity} served here: send the x-request-id "
                    "of a recent answer of this server",
                )
            inputs, rows = kept
            if index >= inputs:
                raise RequestError(
                    404, "NotFound", f"request {request_id!r} had {inputs} input(s): input {index} is not one of them"
                )
            row = rows.get(index)
            answer = {"request_id": request_id, "input": index, "audited": row is not None, "counted": False}
            if row is None or row.label is not None:
                answer["note"] = (
                    "not audited: only the inputs the audit ran through the full model count"
                    if row is None
                    else "labelled before: the first label counts"
                )
                return answer
            row.label = self.label2id[label]
            answer["counted"] = True
            loss = None if row.full is None else paired_loss(row.early == row.label, row.full == row.label)
        if loss is not None:
            self.watch.record_labelled([loss])
        return answer

    def _row(self, request_id: str, index: int) -> _Row | None:
        kept = self._requests.get(request_id)
        return None if kept is None else kept[1].get(index)
