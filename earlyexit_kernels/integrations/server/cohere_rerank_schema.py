"""``POST /rerank`` and ``/v1/rerank`` in Cohere's v1 shape (what Cohere's ``Client``, Infinity's and vLLM's
clients send), and ``POST /v2/rerank`` in Cohere's v2 shape (``ClientV2``, at the end of this module).

Request: ``{"model": NAME, "query": "...", "documents": ["...", {"text": "..."}, ...], "top_n": N,
"return_documents": false, "raw_scores": false, "truncate": false}``. A body with ``documents``
is this shape; one with ``texts`` is text-embeddings-inference's (:mod:`.rerank_schema`).
``model`` may be left out (:mod:`.served_model`); a document is a text or an object with
``"text"`` (its other fields are kept, not read); ``top_n`` keeps the best N (default: all).

Answer (Cohere's v1 rerank, with Infinity's ``object``, ``model``, ``usage`` and ``created``)::

    {"id": REQUEST_ID, "results": [{"index", "relevance_score", "document", "exit_layer", "layers_run"}, ...],
     "meta": {"api_version": {"version": "1"}}, "object": "rerank", "model": NAME,
     "usage": {"prompt_tokens": N, "total_tokens": N}, "created": UNIX_TIME}

best first, equal scores in input order; ``relevance_score`` is ``sigmoid(logit)`` (the logit
with ``raw_scores``), the score of TEI's shape; ``document`` (with ``return_documents``) is the
document as sent, a text as ``{"text": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from earlyexit_kernels.integrations.server.classify_schema import usage
from earlyexit_kernels.integrations.server.predict_schema import TEXT_SCHEMA, RequestError, count, flag
from earlyexit_kernels.integrations.server.rerank_schema import ranking
from earlyexit_kernels.integrations.server.served_model import check_model, model_field_schema

__all__ = [
    "CohereRerankRequest",
    "cohere_rerank_request_from_body",
    "cohere_rerank_request_schema",
    "cohere_rerank_v2_request_from_body",
    "cohere_rerank_v2_request_schema",
    "format_cohere_rerank_answer",
    "format_cohere_rerank_v2_answer",
]

_FIELDS = ("model", "query", "documents", "top_n", "return_documents", "raw_scores", "truncate")


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


def cohere_rerank_request_from_body(body: dict, model_id: str) -> CohereRerankRequest:
    """The parsed body (a JSON object with ``documents``) -> :class:`CohereRerankRequest`."""
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise RequestError(
            422, "Validation", f"unknown field(s) {', '.join(unknown)}; Cohere's rerank takes {', '.join(_FIELDS)}"
        )
    check_model(body, model_id)
    query = body.get("query")
    if not isinstance(query, str):
        raise RequestError(422, "Validation", f"query must be a text, got {json.dumps(query)}")
    if not query:
        raise RequestError(400, "Empty", "query is an empty text; send at least one character")
    raw_documents = body["documents"]
    if not isinstance(raw_documents, list):
        raise RequestError(422, "Validation", 'documents must be a list of texts or of {"text": "..."} objects')
    if not raw_documents:
        raise RequestError(400, "Empty", "documents is an empty list; send at least one document")
    documents = [_document(item, index) for index, item in enumerate(raw_documents)]
    return CohereRerankRequest(
        query,
        documents,
        count(body, "top_n"),
        flag(body, "return_documents"),
        flag(body, "raw_scores"),
        flag(body, "truncate"),
    )


def _document(item, index: int) -> dict:
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise RequestError(
            422, "Validation", f'documents[{index}] must be a text or {{"text": "..."}}, got {json.dumps(item)}'
        )
    if not item["text"]:
        raise RequestError(400, "Empty", f"documents[{index}] is an empty text; send at least one character")
    return item


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


def cohere_rerank_request_schema(model_id: str) -> dict:
    """The JSON Schema of a Cohere-shaped rerank body on a server of ``model_id``."""
    return {
        "type": "object",
        "required": ["query", "documents"],
        "additionalProperties": False,
        "properties": {
            "model": model_field_schema(model_id),
            "query": TEXT_SCHEMA,
            "documents": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "anyOf": [
                        TEXT_SCHEMA,
                        {"type": "object", "required": ["text"], "properties": {"text": TEXT_SCHEMA}},
                    ]
                },
            },
            "top_n": {"type": ["integer", "null"], "minimum": 1, "description": "keep the best N (default: all)"},
            "return_documents": {"type": "boolean", "default": False},
            "raw_scores": {"type": "boolean", "default": False, "description": "the logits instead of sigmoids"},
            "truncate": {"type": "boolean", "default": False},
        },
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

_V2_FIELDS = ("model", "query", "documents", "top_n", "max_tokens_per_doc")


def cohere_rerank_v2_request_from_body(body, model_id: str, max_length: int) -> CohereRerankRequest:
    """The parsed v2 body -> :class:`CohereRerankRequest` (texts, truncated, sigmoid scores, no documents echoed)."""
    if not isinstance(body, dict):
        raise RequestError(422, "Validation", 'the body must be a JSON object {"query": "...", "documents": [...]}')
    unknown = sorted(set(body) - set(_V2_FIELDS))
    if unknown:
        raise RequestError(
            422,
            "Validation",
            f"unknown field(s) {', '.join(unknown)}; Cohere's v2 rerank takes {', '.join(_V2_FIELDS)}",
        )
    if "documents" not in body:
        raise RequestError(422, "Validation", "documents is missing: send the texts to rank as a list")
    documents = body["documents"]
    if not isinstance(documents, list) or any(not isinstance(document, str) for document in documents):
        raise RequestError(422, "Validation", "documents must be a list of texts (Cohere's v2 rerank takes no objects)")
    per_document = count(body, "max_tokens_per_doc")
    if per_document is not None:
        if per_document < max_length:
            raise RequestError(
                422,
                "Validation",
                f"max_tokens_per_doc={per_document} is below the {max_length} tokens this model reads of a query "
                "and document, which is where this server cuts them: leave it out or send at least that",
            )
    parsed = cohere_rerank_request_from_body({k: v for k, v in body.items() if k != "max_tokens_per_doc"}, model_id)
    return CohereRerankRequest(parsed.query, parsed.documents, parsed.top_n, False, False, True)


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


def cohere_rerank_v2_request_schema(model_id: str, max_length: int) -> dict:
    """The JSON Schema of a ``/v2/rerank`` body on a server of ``model_id`` whose model reads ``max_length``
    tokens: v1's, with texts for documents and ``max_tokens_per_doc`` for v1's flags."""
    schema = cohere_rerank_request_schema(model_id)
    properties = {name: schema["properties"][name] for name in ("model", "query", "top_n")}
    properties["documents"] = {"type": "array", "minItems": 1, "items": TEXT_SCHEMA}
    properties["max_tokens_per_doc"] = {
        "type": ["integer", "null"],
        "minimum": max_length,
        "description": "at least the model's length: the query and document are cut there",
    }
    return {**schema, "properties": properties}
