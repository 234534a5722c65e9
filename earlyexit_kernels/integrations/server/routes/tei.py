"""text-embeddings-inference's routes: ``POST /predict`` and ``POST /rerank`` (``/v1/rerank`` the same).

``/predict``: ``{"inputs": ..., "truncate": false, "raw_scores": false, "truncation_direction": "Right"}``
where ``inputs`` is

- a text: ``"I liked it"``;
- a text pair: ``["first text", "second text"]`` (one or two strings);
- a batch: ``[["a text"], ["first", "second"], ...]`` (lists of one or two strings).

``truncate`` cuts a text longer than the model takes, at its end (``"Right"``) or its
start (``"Left"``). Answer: for one input, a list of ``{"score", "label"}`` over every
label, highest score first (softmax probabilities; for a multi-label model each label's
sigmoid probability; the raw logits with ``raw_scores``); for a batch, one
such list per input, in input order. Each entry also carries the input's ``exit_layer``
and ``layers_run``, which clients written for text-embeddings-inference ignore.

``/rerank``: ``{"query": "...", "texts": ["...", ...], "raw_scores": false, "return_text": false,
"truncate": false, "truncation_direction": "Right"}``. Each text is scored as the pair
``(query, text)`` by a one-output model (a cross-encoder, ``num_labels == 1``). Answer: one
``{"index", "score"}`` per text (``"text"`` too with ``return_text``), highest score first, equal
scores in input order; ``score`` is ``sigmoid(logit)``, or the logit with ``raw_scores``. Each entry
also carries its ``exit_layer`` and ``layers_run``. A body with ``documents`` instead is Cohere's
shape, answered in Cohere's (:mod:`.cohere`).

Errors have text-embeddings-inference's status codes (:mod:`..errors`). ``inputs`` is a union of shapes
that JSON Schema states and pydantic's types do not: :func:`predict_inputs` reads it inside the model, its
messages saying what to change in each shape.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, StrictBool, WithJsonSchema

from earlyexit_kernels.integrations.server.errors import RequestError, read_json
from earlyexit_kernels.integrations.server.routes import cohere
from earlyexit_kernels.integrations.server.routes.handling import answer
from earlyexit_kernels.integrations.server.routes.operations import Served, always_refused, post, ref
from earlyexit_kernels.integrations.server.routes.shared import (
    NOT_A_CROSS_ENCODER,
    TEXT_SCHEMA,
    LabelScore,
    Text,
    check_reranks,
    format_answer,
    ranking,
)
from earlyexit_kernels.integrations.server.validation import checked, refused_by, validated

__all__ = [
    "INPUTS_SCHEMA",
    "PredictAnswer",
    "PredictRequest",
    "TeiRerankAnswer",
    "TeiRerankRequest",
    "format_rerank_answer",
    "handlers",
    "operations",
    "parse_predict_request",
    "predict_inputs",
    "schemas",
]

_ONE_OR_TWO_TEXTS = {
    "type": "array",
    "prefixItems": [TEXT_SCHEMA, {"type": "string"}],
    "minItems": 1,
    "maxItems": 2,
    "description": "one text, or a pair of two texts read as one input",
}
#: ``inputs``' JSON Schema (a union JSON Schema states and pydantic's types do not: a pair is not a batch)
INPUTS_SCHEMA = {
    "anyOf": [
        TEXT_SCHEMA,
        _ONE_OR_TWO_TEXTS,
        {"type": "array", "minItems": 1, "items": _ONE_OR_TWO_TEXTS, "description": "a batch"},
    ],
    "description": 'a text, a pair ["a", "b"] (two strings are one pair, not a batch of two), '
    'or a batch [["a"], ["b", "c"]]',
}
_SHAPES = 'a text "...", a pair ["...", "..."], or a batch [["..."], ["...", "..."], ...]'


def predict_inputs(inputs) -> tuple[list[tuple[str, str | None]], bool]:
    """``/predict``'s ``inputs`` -> (text, second text or None) per input, and whether it is a batch (the answer a
    list of lists); :class:`RequestError` says what is wrong with the shape."""
    if isinstance(inputs, str):
        return [_sequence([inputs], 0)], False
    if not isinstance(inputs, list):
        raise RequestError(422, "Validation", f"inputs must be {_SHAPES}; got {type(inputs).__name__}")
    if not inputs:
        raise RequestError(400, "Empty", "inputs is an empty list; send at least one text")
    if all(isinstance(item, str) for item in inputs):
        if len(inputs) > 2:
            raise RequestError(
                422,
                "Validation",
                f"inputs is a list of {len(inputs)} strings; a pair has 2. For a batch, wrap each "
                f'text in a list: [["text 1"], ["text 2"], ...]',
            )
        return [_sequence(inputs, 0)], False
    sequences = []
    for index, item in enumerate(inputs):
        if not isinstance(item, list):
            raise RequestError(
                422, "Validation", f"inputs[{index}] must be a list of one or two strings in a batch ({_SHAPES})"
            )
        sequences.append(_sequence(item, index))
    return sequences, True


def _sequence(texts: list, index: int) -> tuple[str, str | None]:
    if not 1 <= len(texts) <= 2 or not all(isinstance(text, str) for text in texts):
        raise RequestError(
            422,
            "Validation",
            f"input {index} must be one text or a pair of two texts (strings), got {json.dumps(texts)}",
        )
    if texts[0] == "":
        raise RequestError(400, "Empty", f"input {index} is an empty text; send at least one character")
    return texts[0], (texts[1] if len(texts) == 2 else None)


class PredictRequest(BaseModel):
    """text-embeddings-inference's ``/predict`` body."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "inputs": 'a text "...", a pair ["...", "..."], or a batch [["..."], ["...", "..."], ...]',
        "truncate": "true or false",
        "raw_scores": "true or false",
        "truncation_direction": '"Left" or "Right"',
    }

    inputs: Annotated[object, BeforeValidator(refused_by(predict_inputs)), WithJsonSchema(INPUTS_SCHEMA)]
    truncate: StrictBool = False
    raw_scores: StrictBool = False
    truncation_direction: Literal["Left", "Right"] = "Right"

    @property
    def sequences(self) -> list[tuple[str, str | None]]:
        """(text, second text or None) per input."""
        return self.inputs[0]

    @property
    def batched(self) -> bool:
        """Whether the answer is a list of lists (a batch)."""
        return self.inputs[1]


def parse_predict_request(raw: bytes) -> PredictRequest:
    """``/predict``'s body -> :class:`PredictRequest`; :class:`RequestError` says what is wrong."""
    return validated(PredictRequest, raw, '{"inputs": ...}', "/predict")


class PredictAnswer(RootModel[list[LabelScore] | list[list[LabelScore]]]):
    """One input: every label with its score, best first; a batch: one such list per input, in input order."""


class TeiRerankRequest(BaseModel):
    """text-embeddings-inference's ``/rerank`` body: each text scored as the pair ``(query, text)``."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "query": "a string",
        "texts": "a list of strings",
        "raw_scores": "true or false",
        "return_text": "true or false",
        "truncate": "true or false",
        "truncation_direction": '"Left" or "Right"',
    }

    query: Text
    texts: list[Text] = Field(min_length=1)
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool = False
    truncation_direction: Literal["Left", "Right"] = "Right"

    @property
    def sequences(self) -> list[tuple[str, str]]:
        """``(query, text)`` per text, what the model reads."""
        return [(self.query, text) for text in self.texts]


class TeiRerankEntry(BaseModel):
    index: int = Field(ge=0)
    score: float
    text: str = Field("", description="with return_text")
    exit_layer: int
    layers_run: int


class TeiRerankAnswer(RootModel[list[TeiRerankEntry]]):
    """One entry per text, best first."""


def format_rerank_answer(request, finished: list) -> list[dict]:
    """The answer to ``request`` from each text's finished sequence (``logits`` [1], ``exit_layer``, ``layers_run``)."""
    found = []
    for i, score in ranking(finished, request.raw_scores):
        entry = {"index": i, "score": score}
        if request.return_text:
            entry["text"] = request.texts[i]
        entry["exit_layer"] = finished[i].exit_layer
        entry["layers_run"] = finished[i].layers_run
        found.append(entry)
    return found


def handlers(state) -> dict:
    """The routes' handlers over ``state`` (a :class:`~..serving_state.ServingState`), by path."""

    async def predict(request):
        def formatted(parsed, finished, costs):
            answers = [
                format_answer(
                    done.logits, done.exit_layer, done.layers_run, state.id2label, parsed.raw_scores, state.multi_label
                )
                for done in finished
            ]
            return answers if parsed.batched else answers[0]

        return await answer(state, request, parse_predict_request, formatted)

    cohere_model = cohere.cohere_rerank_request_model(state.model_id)

    async def rerank(request):
        def parse(raw):
            check_reranks(state.num_labels)
            body = read_json(raw, '{"query": "...", "texts": [...]} or {"query": "...", "documents": [...]}')
            if isinstance(body, dict) and "documents" in body:
                parsed = checked(cohere_model, body, cohere.COHERE_SHAPE, "Cohere's rerank")
                return cohere.cohere_request(parsed, state.model_id)
            return checked(TeiRerankRequest, body, '{"query": "...", "texts": [...]}', "/rerank")

        def formatted(parsed, finished, costs):
            if isinstance(parsed, cohere.CohereRerankRequest):
                return cohere.format_cohere_rerank_answer(
                    parsed,
                    finished,
                    model_id=state.model_id,
                    request_id=request.state.request_id,
                    tokens=costs.tokens,
                    created=int(time.time()),
                )
            return format_rerank_answer(parsed, finished)

        return await answer(state, request, parse, formatted)

    return {"/predict": predict, "/rerank": rerank, "/v1/rerank": rerank}


def operations(served: Served) -> dict:
    """The routes' OpenAPI entries, by path."""
    rerank = post(
        served.summaries["/rerank"],
        "A body with `texts` is text-embeddings-inference's shape and gets its answer (a list); one with "
        "`documents` is Cohere's and gets Cohere's answer (`results`). The model must have one output "
        "(a cross-encoder), otherwise 400.",
        {"oneOf": [ref("TeiRerankRequest"), ref("CohereRerankRequest")]},
        {"oneOf": [ref("TeiRerankAnswer"), ref("CohereRerankAnswer")]},
        served.named_errors,
    )
    if not served.reranks:
        operation = rerank["post"]
        operation["description"] = (
            "This server's model has more than one output: every request gets 400 saying to use /classify "
            "or /predict. " + operation["description"]
        )
        operation["responses"] = always_refused(NOT_A_CROSS_ENCODER, served.keyed)
    predict = post(
        served.summaries["/predict"],
        "`inputs`: a text, a pair of two texts (one input read as a pair, not a batch of two), or a batch "
        "of lists of one or two texts. One input gets a list of every label with its score, best first; a "
        "batch one such list per input.",
        ref("PredictRequest"),
        ref("PredictAnswer"),
        served.errors,
    )
    return {"/predict": predict, "/rerank": rerank, "/v1/rerank": rerank}


def schemas(served: Served) -> list[type[BaseModel]]:
    """The models of the routes' bodies (the OpenAPI document's components)."""
    return [PredictRequest, PredictAnswer, TeiRerankRequest, TeiRerankAnswer]
