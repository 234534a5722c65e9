"""``POST /classify`` and ``POST /v1/classify``: classification in the shape Infinity and vLLM serve.

Request: ``{"model": NAME, "input": "..." | ["...", ...], "raw_scores": false, "truncate": false}``.
``model`` may be left out (:mod:`.served_model`); ``input`` is one text or a list of texts
(Infinity takes a list, vLLM either); ``raw_scores`` (Infinity's) answers the logits instead
of the probabilities; ``truncate`` cuts a text longer than the model takes (otherwise 413, as
``/predict``); ``user`` (OpenAI's) is accepted and ignored.

Answer (Infinity's ``/classify`` shape)::

    {"object": "classify", "data": [[{"label", "score", "exit_layer", "layers_run"}, ...], ...],
     "model": NAME, "usage": {"prompt_tokens": N, "total_tokens": N}, "id": REQUEST_ID, "created": UNIX_TIME}

one list per input, in input order, every label with its score best first, the scores of
``/predict`` (:func:`.predict_schema.format_answer`). ``usage`` counts the tokens the model read,
special tokens included; ``id`` is the request id (the ``x-request-id`` header). vLLM's own
``/classify`` answers one ``{"index", "label", "probs", "num_classes"}`` per input instead; a
client of it reads the best label as ``data[i][0]["label"]`` here.

The request's schema and validation are a pydantic model (:func:`.bodies.classify_request_model`);
here, the answer.
"""

from __future__ import annotations

from earlyexit_kernels.integrations.server.predict_schema import (
    format_answer,
)

__all__ = ["format_classify_answer", "usage"]


def usage(tokens: int) -> dict:
    """OpenAI's ``usage`` of a request whose texts held ``tokens`` tokens (nothing is generated)."""
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def format_classify_answer(
    request,
    finished: list,
    *,
    id2label: dict,
    multi_label: bool,
    model_id: str,
    request_id: str,
    tokens: int,
    created: int,
) -> dict:
    """The answer to ``request`` from each text's finished sequence."""
    data = [
        format_answer(done.logits, done.exit_layer, done.layers_run, id2label, request.raw_scores, multi_label)
        for done in finished
    ]
    return {
        "object": "classify",
        "data": data,
        "model": model_id,
        "usage": usage(tokens),
        "id": request_id,
        "created": created,
    }
