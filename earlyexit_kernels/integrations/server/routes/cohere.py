"""Cohere's rerank shapes: v1 on ``POST /rerank`` and ``/v1/rerank`` (a body with ``documents``: what
Cohere's ``Client``, Infinity's and vLLM's clients send; :mod:`.tei` owns those routes and hands such a
body here), and v2 on ``POST /v2/rerank`` (``cohere.ClientV2``).

v1 request: ``{"model": NAME, "query": "...", "documents": ["...", {"text": "..."}, ...], "top_n": N,
"return_documents": false, "raw_scores": false, "truncate": false}``. ``model`` may be left out
(:mod:`..served_model`); a document is a text or an object with ``"text"`` (its other fields are kept,
not read); ``top_n`` keeps the best N (default: all).

v1 answer (Cohere's, with Infinity's ``object``, ``model``, ``usage`` and ``created``)::

    {"id": REQUEST_ID, "results": [{"index", "relevance_score", "document", "exit_layer", "layers_run"}, ...],
     "meta": {"api_version": {"version": "1"}}, "object": "rerank", "model": NAME,
     "usage": {"prompt_tokens": N, "total_tokens": N}, "created": UNIX_TIME}

best first, equal scores in input order; ``relevance_score`` is ``sigmoid(logit)`` (the logit
with ``raw_scores``), the score of TEI's shape; ``document`` (with ``return_documents``) is the
document as sent, a text as ``{"text": ...}``.

v2 (recorded from cohere 7.3.1): ``{"model": NAME, "query": "...", "documents": ["...", ...], "top_n": N,
"max_tokens_per_doc": N}``, documents as texts only. Cohere cuts a document past ``max_tokens_per_doc``
(4096 by default) instead of refusing it: here the query and document are cut to the model's positions, as
``"truncate": true`` does. The answer is v2's: ``{"id", "results": [{"index", "relevance_score",
"exit_layer", "layers_run"}], "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units":
1}}}``, no documents echoed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.routes.handling import answer
from earlyexit_kernels.integrations.server.routes.operations import Served, always_refused, post, ref
from earlyexit_kernels.integrations.server.routes.shared import (
    NOT_A_CROSS_ENCODER,
    Count,
    Text,
    Usage,
    check_reranks,
    named,
    ranking,
    usage,
)
from earlyexit_kernels.integrations.server.served_model import check_model
from earlyexit_kernels.integrations.server.validation import validated

__all__ = [
    "COHERE_SHAPE",
    "CohereRerankAnswer",
    "CohereRerankRequest",
    "CohereRerankV2Answer",
    "cohere_request",
    "cohere_rerank_request_model",
    "cohere_rerank_v2_request_model",
    "cohere_v2_request",
    "format_cohere_rerank_answer",
    "format_cohere_rerank_v2_answer",
    "handlers",
    "operations",
    "schemas",
]

COHERE_SHAPE = '{"model": "...", "query": "...", "documents": ["...", {"text": "..."}, ...]}'
COHERE_V2_SHAPE = '{"model": "...", "query": "...", "documents": ["...", ...]}'


class CohereDocument(BaseModel):
    """A document as an object: its ``text`` read, its other fields kept (echoed with return_documents)."""

    model_config = ConfigDict(extra="allow")
    text: Text


class _CohereRerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "query": "a text",
        "documents": 'a list of texts or of {"text": "..."} objects',
        "documents[]": 'a text or {"text": "..."}',
        "top_n": "an integer >= 1",
        "return_documents": "true or false",
        "raw_scores": "true or false",
        "truncate": "true or false",
        "model": "a string (the served model's name)",
    }

    query: Text
    documents: list[Text | CohereDocument] = Field(min_length=1)
    top_n: Count | None = Field(None, description="keep the best N (default: all)")
    return_documents: StrictBool = False
    raw_scores: StrictBool = Field(False, description="the logits instead of sigmoids")
    truncate: StrictBool = False

    @property
    def sequences(self) -> list[tuple[str, str]]:
        """``(query, document text)`` per document, what the model reads."""
        return [(self.query, document["text"]) for document in self.document_dicts]

    @property
    def document_dicts(self) -> list[dict]:
        """Each document as an object, as sent (a text as ``{"text": ...}``)."""
        return [{"text": d} if isinstance(d, str) else d.model_dump() for d in self.documents]


class _CohereRerankV2Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "query": "a text",
        "documents": "a list of texts (Cohere's v2 rerank takes no objects)",
        "documents[]": "a text: documents is a list of texts (Cohere's v2 rerank takes no objects)",
        "top_n": "an integer >= 1",
        "max_tokens_per_doc": "an integer >= 1",
        "model": "a string (the served model's name)",
    }

    query: Text
    documents: list[Text] = Field(min_length=1)
    top_n: Count | None = Field(None, description="keep the best N (default: all)")
    max_tokens_per_doc: Count | None = None


def cohere_rerank_request_model(model_id: str) -> type[BaseModel]:
    """Cohere's v1 rerank body (``/rerank``, ``/v1/rerank`` with ``documents``) on a server of ``model_id``."""
    return named(_CohereRerankRequest, "CohereRerankRequest", model_id)


def cohere_rerank_v2_request_model(model_id: str, max_length: int) -> type[BaseModel]:
    """Cohere's v2 rerank body (``/v2/rerank``) on a server of ``model_id`` whose model reads ``max_length`` tokens."""
    per_document = Annotated[
        Count | None,
        WithJsonSchema(
            {
                "type": ["integer", "null"],
                "minimum": max_length,
                "description": f"at least the {max_length} tokens this model reads (query and document are cut "
                "there, as Cohere cuts them); default: Cohere's 4096",
            }
        ),
    ]
    return named(_CohereRerankV2Request, "CohereRerankV2Request", model_id, max_tokens_per_doc=(per_document, None))


class Document(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int = Field(ge=0)
    relevance_score: float
    document: Document = Field(None, description="with return_documents")
    exit_layer: int
    layers_run: int


class CohereRerankV2Answer(BaseModel):
    """Cohere's v2 rerank answer."""

    id: str = Field(description="the request id (the x-request-id header)")
    results: list[CohereResult] = Field(description="best first")
    meta: dict


class CohereRerankAnswer(CohereRerankV2Answer):
    """Cohere's v1 rerank answer, with Infinity's fields."""

    object: Literal["rerank"]
    model: str
    usage: Usage
    created: int


@dataclass(frozen=True)
class CohereRerankRequest:
    """A validated v1 or v2 body, as the model reads it and the answer is made."""

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
    """A validated v1 body (:func:`cohere_rerank_request_model`) -> :class:`CohereRerankRequest`;
    404 for a model name not served here."""
    check_model({"model": parsed.model}, model_id)
    return CohereRerankRequest(
        parsed.query, parsed.document_dicts, parsed.top_n, parsed.return_documents, parsed.raw_scores, parsed.truncate
    )


def format_cohere_rerank_answer(
    request: CohereRerankRequest, finished: list, *, model_id: str, request_id: str, tokens: int, created: int
) -> dict:
    """The v1 answer to ``request`` from each document's finished sequence (``logits`` [1])."""
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


def cohere_v2_request(parsed, model_id: str, max_length: int) -> CohereRerankRequest:
    """A validated v2 body (:func:`cohere_rerank_v2_request_model`) -> :class:`CohereRerankRequest`
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


def handlers(state) -> dict:
    """The routes' handlers over ``state`` (a :class:`~..serving_state.ServingState`), by path."""
    v2_model = cohere_rerank_v2_request_model(state.model_id, state.max_length)

    async def rerank_v2(request):
        def parse(raw):
            check_reranks(state.num_labels)
            parsed = validated(v2_model, raw, COHERE_V2_SHAPE, "Cohere's v2 rerank")
            return cohere_v2_request(parsed, state.model_id, state.max_length)

        def formatted(parsed, finished, costs):
            return format_cohere_rerank_v2_answer(parsed, finished, request_id=request.state.request_id)

        return await answer(state, request, parse, formatted)

    return {"/v2/rerank": rerank_v2}


def operations(served: Served) -> dict:
    """The routes' OpenAPI entries, by path."""
    rerank_v2 = post(
        served.summaries["/v2/rerank"],
        "What `cohere.ClientV2(base_url=...).rerank(model=..., query=..., documents=[...])` sends. Documents "
        "are texts; a query and document past the model's length are cut there (as Cohere cuts them), so "
        "`max_tokens_per_doc` below that length gets 422. The model must have one output, otherwise 400.",
        ref("CohereRerankV2Request"),
        ref("CohereRerankV2Answer"),
        served.named_errors,
    )
    if not served.reranks:
        rerank_v2["post"]["responses"] = always_refused(NOT_A_CROSS_ENCODER, served.keyed)
    return {"/v2/rerank": rerank_v2}


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the routes' bodies (the OpenAPI document's components)."""
    return [
        CohereRerankAnswer,
        CohereRerankV2Answer,
        cohere_rerank_request_model(served.model_id),
        cohere_rerank_v2_request_model(served.model_id, served.max_length),
    ]
