"""Bodies of the server's routes as pydantic models: the OpenAPI document's JSON Schemas are generated from
these, and every request is validated by its model.

Every answer (the error body, the classification and reranking routes' answers, ``/health``, ``/info``,
``/v1/models``, ``/models``, ``/feedback``'s) and every request (``/predict``, ``/classify``,
``/rerank`` in TEI's and Cohere's shapes, ``/v2/rerank``, ``/``, ``/feedback``). Where a field is a
union of shapes that JSON Schema states and pydantic's types do not (``/predict``'s and ``/``'s
``inputs``), a function reads it inside the model (:func:`.predict_schema.predict_inputs`,
:func:`.inference_api_schema.inference_inputs`), its messages saying what to change in each shape
(``wrap each text in a list`` ...) passed through as they are.

How a refusal is worded: :mod:`.validation`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    Strict,
    StrictBool,
    WithJsonSchema,
    create_model,
)

from earlyexit_kernels.integrations.server.inference_api_schema import (
    INFERENCE_INPUTS_SCHEMA,
    inference_inputs,
    inference_parameters,
)
from earlyexit_kernels.integrations.server.predict_schema import INPUTS_SCHEMA, predict_inputs
from earlyexit_kernels.integrations.server.validation import checked, refused_by, validated

__all__ = [
    "ANSWERS",
    "ClassifyAnswer",
    "CohereRerankAnswer",
    "CohereRerankV2Answer",
    "Error",
    "FeedbackAnswer",
    "Health",
    "Info",
    "InferenceApiAnswer",
    "InferenceApiRequest",
    "InferenceParameters",
    "InfinityModels",
    "Models",
    "PredictAnswer",
    "PredictRequest",
    "TeiRerankAnswer",
    "TeiRerankRequest",
    "feedback_request_model",
    "parse_predict_request",
]


class Error(BaseModel):
    error: str = Field(description="what is wrong and what to change")
    error_type: str = Field(examples=["Validation", "Empty", "NotFound", "Overloaded"])


class LabelScore(BaseModel):
    """One label's score for an input, with the input's exit."""

    score: float
    label: str
    exit_layer: int = Field(description="the layer after which the input left the encoder")
    layers_run: int = Field(description="layers computed (differs only with SkipGates)")


class PredictAnswer(RootModel[list[LabelScore] | list[list[LabelScore]]]):
    """One input: every label with its score, best first; a batch: one such list per input, in input order."""


class InferenceApiAnswer(RootModel[list[list[LabelScore]]]):
    """One list per input."""


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class ClassifyAnswer(BaseModel):
    """Infinity's ``/classify`` answer."""

    object: Literal["classify"]
    data: list[list[LabelScore]] = Field(description="one list per input, in input order")
    model: str
    usage: Usage
    id: str = Field(description="the request id (the x-request-id header)")
    created: int = Field(description="Unix time of the answer")


class TeiRerankEntry(BaseModel):
    index: int = Field(ge=0)
    score: float
    text: str = Field("", description="with return_text")
    exit_layer: int
    layers_run: int


class TeiRerankAnswer(RootModel[list[TeiRerankEntry]]):
    """One entry per text, best first."""


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


class Health(BaseModel):
    status: Literal["ok"]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when the server started (Unix time)")
    owned_by: str


class Models(BaseModel):
    """``GET /v1/models``: OpenAI's shape."""

    object: Literal["list"]
    data: list[ModelEntry]


class InfinityModelEntry(ModelEntry):
    owned_by: Literal["infinity"] = Field(description="what Infinity's client accepts")
    backend: Literal["earlyexit_kernels"] = "earlyexit_kernels"
    capabilities: list[str] = []
    stats: dict


class InfinityModels(BaseModel):
    """``GET /models``: Infinity's shape (what ``infinity_client``'s ``models`` parses)."""

    object: Literal["list"]
    data: list[InfinityModelEntry]


class Info(BaseModel):
    """``GET /info``: the model and the server's settings."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str = Field(description="the served model's name (GET /v1/models)")
    model_type: str
    architecture: str = ""
    problem_type: str = ""
    num_layers: int
    labels: list[str]
    policy: str
    backend: str = ""
    dtype: str = ""
    max_batch_size: int = 0
    max_client_batch_size: int = 0
    max_tokens: int | None = None
    max_length: int
    max_queue: int = 0
    max_age: int | None = Field(
        None, description="bounded waiting: layer calls after which a sequence is served first (null: no age rule)"
    )
    audit: dict | None = None
    recertify: dict | None = Field(
        None, description="online re-certification: the policy served, its path index, epoch and moves (null: off)"
    )


Text = Annotated[str, Field(min_length=1)]


def _whole(value):
    """JSON Schema's integer: ``3.0`` is 3; a boolean is no integer (Python's ``True == 1`` aside)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is no integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer >= 1, as JSON writes it
Count = Annotated[int, Strict(), Field(ge=1), BeforeValidator(_whole)]


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


class InferenceParameters(BaseModel):
    """The Inference API's text classification ``parameters``."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "function_to_apply": '"softmax", "sigmoid", "none" or null',
        "top_k": "an integer >= 1",
        "truncation": "true or false",
    }

    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="default: the model's own"
    )
    top_k: Count | None = Field(None, description="default: every label")
    truncation: StrictBool = False


def _parameters(value):
    """``parameters`` checked by their own model, so that a refusal names the parameter."""
    return checked(InferenceParameters, inference_parameters(value), "parameters: {...} or null", "parameters")


class InferenceApiRequest(BaseModel):
    """What ``huggingface_hub.InferenceClient(base_url=...).text_classification`` sends to ``/``."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {"inputs": "a text or a list of texts", "parameters": "a JSON object"}

    inputs: Annotated[object, BeforeValidator(refused_by(inference_inputs)), WithJsonSchema(INFERENCE_INPUTS_SCHEMA)]
    parameters: Annotated[
        InferenceParameters | None,
        BeforeValidator(refused_by(_parameters)),
        WithJsonSchema({"anyOf": [{"$ref": "#/components/schemas/InferenceParameters"}, {"type": "null"}]}),
    ] = None
    options: object = Field(None, description="accepted and ignored (the Inference API's wait_for_model, use_cache)")

    @property
    def sequences(self) -> list[tuple[str, str | None]]:
        return self.inputs

    @property
    def function_to_apply(self) -> str | None:
        return None if self.parameters is None else self.parameters.function_to_apply

    @property
    def top_k(self) -> int | None:
        return None if self.parameters is None else self.parameters.top_k

    @property
    def truncate(self) -> bool:
        return self.parameters is not None and self.parameters.truncation


def _listed(value):
    """One text as a list of one (``/classify``'s ``input``)."""
    return [value] if isinstance(value, str) else value


class _ClassifyRequest(BaseModel):
    """Infinity's and vLLM's ``/classify`` body."""

    model_config = ConfigDict(extra="forbid")
    MUST: ClassVar[dict[str, str]] = {
        "input": "a text or a list of texts",
        "raw_scores": "true or false",
        "truncate": "true or false",
        "user": "a string",
        "model": "a string (the served model's name)",
    }
    ITEM: ClassVar[str] = "{field} {index}"

    input: Annotated[
        list[Text],
        BeforeValidator(_listed),
        Field(min_length=1),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                ]
            }
        ),
    ]
    raw_scores: StrictBool = Field(False, description="the logits instead of probabilities")
    truncate: StrictBool = False
    user: str | None = Field(None, description="accepted and ignored")

    @property
    def sequences(self) -> list[tuple[str, None]]:
        return [(text, None) for text in self.input]


def classify_request_model(model_id: str) -> type[BaseModel]:
    """``/classify``'s body on a server of ``model_id``."""
    return _named(_ClassifyRequest, "ClassifyRequest", model_id)


def _named(base: type[BaseModel], name: str, model_id: str, **fields) -> type[BaseModel]:
    """``base`` with ``model``: any text or null, documented as the served names (a name not served is
    404, which :func:`~.served_model.check_model` says after validation)."""
    from earlyexit_kernels.integrations.server.served_model import model_field_schema

    served = Annotated[str | None, WithJsonSchema(model_field_schema(model_id))]
    return create_model(name, __base__=base, model=(served, None), **fields)


def cohere_rerank_request_model(model_id: str) -> type[BaseModel]:
    """Cohere's v1 rerank body (``/rerank``, ``/v1/rerank`` with ``documents``) on a server of ``model_id``."""
    return _named(_CohereRerankRequest, "CohereRerankRequest", model_id)


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
    return _named(_CohereRerankV2Request, "CohereRerankV2Request", model_id, max_tokens_per_doc=(per_document, None))


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


class _FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the answer's x-request-id")
    input: Annotated[int, Strict(), Field(ge=0), BeforeValidator(_whole)] = Field(
        0, description="which input of that request, from 0 (a batch's position)"
    )


def feedback_request_model(labels: list[str]) -> type[BaseModel]:
    """``POST /feedback``'s body on a server whose model has ``labels``: ``label`` is one of them."""
    return create_model(
        "FeedbackRequest",
        __base__=_FeedbackRequest,
        label=(Literal[tuple(labels)], Field(description="the input's true label")),
    )


class FeedbackAnswer(BaseModel):
    request_id: str
    input: int
    audited: bool = Field(description="whether the audit ran this input through the full model")
    counted: bool = Field(description="whether the label counts on the accuracy lost")
    note: str = Field("", description="why it does not count")


#: every answer's model (the request bodies' are added per server: :func:`feedback_request_model`)
ANSWERS = [
    Error,
    PredictAnswer,
    ClassifyAnswer,
    TeiRerankAnswer,
    CohereRerankAnswer,
    CohereRerankV2Answer,
    InferenceApiAnswer,
    Health,
    Info,
    Models,
    InfinityModels,
    FeedbackAnswer,
]
