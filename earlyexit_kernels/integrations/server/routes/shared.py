"""What several protocols' bodies share: a text, a count, the ``model`` field, a label's score with the
input's exit, a ranking of one-output scores, OpenAI's ``usage``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import BaseModel, BeforeValidator, Field, Strict, WithJsonSchema, create_model

from earlyexit_kernels.integrations.labels import name_in
from earlyexit_kernels.integrations.server.errors import RequestError
from earlyexit_kernels.integrations.server.served_model import model_field_schema

__all__ = [
    "NOT_A_CROSS_ENCODER",
    "TEXT_SCHEMA",
    "Count",
    "LabelScore",
    "Text",
    "Usage",
    "check_reranks",
    "format_answer",
    "named",
    "ranking",
    "usage",
    "whole",
]

#: a text the model reads: at least one character
TEXT_SCHEMA = {"type": "string", "minLength": 1}

Text = Annotated[str, Field(min_length=1)]


def whole(value):
    """JSON Schema's integer: ``3.0`` is 3; a boolean is no integer (Python's ``True == 1`` aside)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is no integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer >= 1, as JSON writes it
Count = Annotated[int, Strict(), Field(ge=1), BeforeValidator(whole)]


def named(base: type[BaseModel], name: str, model_id: str, **fields) -> type[BaseModel]:
    """``base`` with ``model``: any text or null, documented as the served names (a name not served is
    404, which :func:`~..served_model.check_model` says after validation)."""
    served = Annotated[str | None, WithJsonSchema(model_field_schema(model_id))]
    return create_model(name, __base__=base, model=(served, None), **fields)


class LabelScore(BaseModel):
    """One label's score for an input, with the input's exit."""

    score: float
    label: str
    exit_layer: int = Field(description="the layer after which the input left the encoder")
    layers_run: int = Field(description="layers computed (differs only with SkipGates)")


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


def usage(tokens: int) -> dict:
    """OpenAI's ``usage`` of a request whose texts held ``tokens`` tokens (nothing is generated)."""
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def format_answer(
    logits: torch.Tensor,
    exit_layer: int,
    layers_run: int,
    id2label: dict,
    raw_scores: bool,
    multi_label: bool = False,
) -> list:
    """One input's answer: ``{"score", "label", "exit_layer", "layers_run"}`` per label, best first.

    ``logits``: [C]. Scores are the softmax; with ``multi_label`` each label's sigmoid
    (independent labels); with ``raw_scores`` the logits. A regression head (C = 1)
    answers its value as the score.
    """
    logits = logits.float()
    if raw_scores or (logits.numel() == 1 and not multi_label):
        scores = logits
    else:
        scores = torch.sigmoid(logits) if multi_label else logits.softmax(-1)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    values = scores.tolist()
    return [
        {"score": values[c], "label": name_in(id2label, c), "exit_layer": exit_layer, "layers_run": layers_run}
        for c in order
    ]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def ranking(finished: list, raw_scores: bool) -> list[tuple[int, float]]:
    """``(index, score)`` of each text, best first, equal scores in input order: ``sigmoid(logit)``,
    or the logit with ``raw_scores``."""
    logits = [float(done.logits.float()[0]) for done in finished]
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    return [(i, logits[i] if raw_scores else _sigmoid(logits[i])) for i in order]


#: why a route refuses every request on a model with more than one output (its OpenAPI entry)
NOT_A_CROSS_ENCODER = "every request: the model is no cross-encoder"


def check_reranks(num_labels: int) -> None:
    """400 unless the model has one output (a cross-encoder): what the rerank routes need."""
    if num_labels != 1:
        raise RequestError(
            400,
            "Validation",
            f"/rerank needs a cross-encoder with one output (num_labels == 1); this model has "
            f"num_labels={num_labels}: use /predict or /classify",
        )
