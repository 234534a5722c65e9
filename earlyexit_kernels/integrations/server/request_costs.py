"""Where one request's time went: the timing headers of the server's answers and the
``eek_request_*_seconds`` histograms (:mod:`.metrics`) are the spans of :class:`RequestCosts`."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["HEADERS", "RequestCosts"]

#: the answer's header of each span (milliseconds; text-embeddings-inference's names)
HEADERS = {
    "tokenization": "x-tokenization-time",
    "queue": "x-queue-time",
    "inference": "x-inference-time",
    "layers": "x-layer-time",
    "waiting": "x-layer-wait-time",
    "answer": "x-answer-time",
    "total": "x-total-time",
}


@dataclass
class RequestCosts:
    """What a request cost: where its time went, and the tokens its texts held (``tokens``, special
    tokens included: the ``usage`` of the OpenAI-style answers, TEI's ``x-compute-tokens``).

    Marks on one clock (``time.perf_counter()``), each no earlier than the one before, so the spans
    between them do not overlap and all lie within the request's wall time:

    - ``tokenization``: from the request's arrival (the app's receiving it, before any middleware
      or its body is read) until its texts are tokenized (reading and parsing the body included);
    - ``queue``: from then until the engine admits the request's first sequence (embeds it into the
      first layer): waiting for the engine thread to take the request, then for room in the engine;
    - ``inference``: from then until the server holds its last sequence's answer (every sequence's
      layers, those admitted later included);
    - ``total``: from its arrival to its answer (the two above plus parsing, handing over and
      formatting).

    The inference splits in two: ``layers``, the seconds the request's slowest sequence (the one
    longest in calls) spent in the layer calls that held it, and ``waiting``, the rest, when its
    sequences waited for a call (others' calls, admissions, the engine thread's turn). ``answer``:
    from its last sequence's answer to its own (handing back, formatting; the total's last part).

    As headers, in milliseconds (text-embeddings-inference's names; ``x-compute-time`` is TEI's
    other name for the total); as the ``eek_request_*_seconds`` histograms, in seconds, for each
    answered request. TEI gives a batch the mean of its texts' times instead: here a batch is one
    request, its spans are the request's own.
    """

    arrived: float
    tokenized: float | None = None
    admitted: float | None = None  # the engine's admission of the request's first sequence
    done: float | None = None
    answered: float | None = None
    tokens: int = 0
    in_calls: float | None = None  # seconds: the most any of its sequences spent in layer calls

    def spans(self) -> dict[str, float]:
        """Seconds of each span whose ends are known (``total``: until ``answered``, else until now)."""
        end = time.perf_counter() if self.answered is None else self.answered
        marks = {
            "tokenization": (self.arrived, self.tokenized),
            "queue": (self.tokenized, self.admitted),
            "inference": (self.admitted, self.done),
            "total": (self.arrived, end),
        }
        spans = {name: finish - start for name, (start, finish) in marks.items() if None not in (start, finish)}
        if "inference" in spans and self.in_calls is not None:
            spans["layers"] = min(self.in_calls, spans["inference"])
            spans["waiting"] = spans["inference"] - spans["layers"]
        if self.done is not None and self.answered is not None:
            spans["answer"] = self.answered - self.done
        return spans

    def headers(self) -> dict[str, str]:
        headers = {HEADERS[name]: str(round(1000 * seconds)) for name, seconds in self.spans().items()}
        headers["x-compute-time"] = headers["x-total-time"]
        if self.tokenized is not None:
            headers["x-compute-tokens"] = str(self.tokens)
        return headers
