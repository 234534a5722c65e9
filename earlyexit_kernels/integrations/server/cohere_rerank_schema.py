"""``POST /rerank`` and ``/v1/rerank`` in Cohere's v1 shape (what Cohere's ``Client``, Infinity's and vLLM's
clients send), and ``POST /v2/rerank`` in Cohere's v2 shape (``ClientV2``, at the end of this module).

Request: ``{"model": NAME, "query": "...", "documents": ["...", {"text": "..."}, ...], "top_n": N,
"return_documents": false, "raw_scores": false, "truncate": false}``. A body with ``documents``
is this shape; one with ``texts`` is text-embeddings-inference's (:mod:`.rerank_schema`).
``model`` may be left out (:mod:`.served_model`); a document is a text or an object with
``"text"`` (its other fields are kept, not read); ``top_n`` keeps the best N (default: all). The
requests' schemas and validation are pydantic models (:func:`.bodies.cohere_rerank_request_model`,
:func:`.bodies.cohere_rerank_v2_request_model`); here, what follows validation and the answers.

Answer (Cohere's v1 rerank, with Infinity's ``object``, ``model``, ``usage`` and ``created``)::

    {"id": REQUEST_ID, "results": [{"index", "relevance_score", "document", "exit_layer", "layers_run"}, ...],
     "meta": {"api_version": {"version": "1"}}, "object": "rerank", "model": NAME,
     "usage": {"prompt_tokens": N, "total_tokens": N}, "created": UNIX_TIME}

best first, equal scores in input order; ``relevance_score`` is ``sigmoid(logit)`` (the logit
with ``raw_scores``), the score of TEI's shape; ``document`` (with ``return_documents``) is the
document as sent, a text as ``{"text": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from earlyexit_kernels.integrations.server.classify_schema import usage
from earlyexit_kernels.integrations.server.predict_schema import RequestError
from earlyexit_kernels.integrations.server.rerank_schema import ranking
from earlyexit_kernels.integrations.server.served_model import check_model

__all__ = [
    "CohereRerankRequest",
    "cohere_request",
    "cohere_v2_request",
    "format_cohere_rerank_answer",
    "format_cohere_rerank_v2_answer",
]


@dataclass(frozen=True)
class CohereRerankRequest:
    query: str
    documents: list[dict]  # each {"text": ..., ...} as sent (a text sent alone becomes {"text": text})
    top_n: int | None
    return_documents: bool
    raw_scores: bool
    truncate: bool

    @property
    def sequences(self) -> list[tuple[str, str]]:
        """``(query, document text)`` per document, what the model reads."""
        return [(self.query, document["text"]) for document in self.documents]


def cohere_request(parsed, model_id: str) -> CohereRerankRequest:
    """A validated v1 body (:func:`.bodies.cohere_rerank_request_model`) -> :class:`CohereRerankRequest`;
    404 for a model name not served here."""
    check_model({"model": parsed.model}, model_id)
    return CohereRerankRequest(
        parsed.query, parsed.document_dicts, parsed.top_n, parsed.return_documents, parsed.raw_scores, parsed.truncate
    )


def format_cohere_rerank_answer(
    request: CohereRerankRequest, finished: list, *, model_id: str, request_id: str, tokens: int, created: int
) -> dict:
    """The answer to ``request`` from each document's finished sequence (``logits`` [1])."""
    results = []
    for index, score in ranking(finished, request.raw_scores)[: request.top_n]:
        result = {"index": index, "relevance_score": score}
        if request.return_documents:
            result["document"] = request.documents[index]
        result["exit_layer"] = finished[index].exit_layer
        result["layers_run"] = finished[index].layers_run
        results.append(result)
    return {
        "id": request_id,
        "results": results,
        "meta": {"api_version": {"version": "1"}},
        "object": "rerank",
        "model": model_id,
        "usage": usage(tokens),
        "created": created,
    }


# ------------------------------------------------------------------------------ Cohere's v2 rerank
#
# ``POST /v2/rerank``, what ``cohere.ClientV2(base_url=...).rerank(...)`` sends (recorded from cohere
# 7.3.1): ``{"model": NAME, "query": "...", "documents": ["...", ...], "top_n": N,
# "max_tokens_per_doc": N}``, documents as texts only. Cohere cuts a document past
# ``max_tokens_per_doc`` (4096 by default) instead of refusing it: here the query and document are
# cut to the model's positions, as ``"truncate": true`` does. The answer is v2's: ``{"id",
# "results": [{"index", "relevance_score", "exit_layer", "layers_run"}], "meta": {"api_version":
# {"version": "2"}, "billed_units": {"search_units": 1}}}``, no documents echoed.


def cohere_v2_request(parsed, model_id: str, max_length: int) -> CohereRerankRequest:
    """A validated v2 body (:func:`.bodies.cohere_rerank_v2_request_model`) -> :class:`CohereRerankRequest`
    (texts, truncated, sigmoid scores, no documents echoed); 404 for a model name not served here, 422 for
    a ``max_tokens_per_doc`` below the model's length."""
    check_model({"model": parsed.model}, model_id)
    per_document = parsed.max_tokens_per_doc
    if per_document is not None and per_document < max_length:
        raise RequestError(
            422,
            "Validation",
            f"max_tokens_per_doc={per_document} is below the {max_length} tokens this model reads of a query "
            "and document, which is where this server cuts them: leave it out or send at least that",
        )
    return CohereRerankRequest(
        parsed.query, [{"text": text} for text in parsed.documents], parsed.top_n, False, False, True
    )


def format_cohere_rerank_v2_answer(request: CohereRerankRequest, finished: list, *, request_id: str) -> dict:
    """Cohere's v2 answer to ``request`` from each document's finished sequence (``logits`` [1])."""
    results = [
        {
            "index": index,
            "relevance_score": score,
            "exit_layer": finished[index].exit_layer,
            "layers_run": finished[index].layers_run,
        }
        for index, score in ranking(finished, False)[: request.top_n]
    ]
    return {
        "id": request_id,
        "results": results,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }
