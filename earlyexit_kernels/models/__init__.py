"""The supported encoder families: one adapter per Hugging Face sequence classifier.

``SUPPORTED_MODELS`` maps each Hugging Face class to its adapter; :func:`adapter_class`
finds the adapter of a model (``TypeError`` naming the supported classes otherwise).
"""

from __future__ import annotations

from transformers import (
    AlbertForSequenceClassification,
    BertForSequenceClassification,
    CamembertForSequenceClassification,
    DebertaV2ForSequenceClassification,
    DistilBertForSequenceClassification,
    ElectraForSequenceClassification,
    ModernBertForSequenceClassification,
    RobertaForSequenceClassification,
    XLMRobertaForSequenceClassification,
)

from earlyexit_kernels.models.albert import AlbertAdapter
from earlyexit_kernels.models.base import EncoderAdapterBase, TanhPoolerHead
from earlyexit_kernels.models.bert import BertAdapter
from earlyexit_kernels.models.deberta_v2 import DebertaV2Adapter
from earlyexit_kernels.models.distilbert import DistilBertAdapter
from earlyexit_kernels.models.electra import ElectraAdapter
from earlyexit_kernels.models.modernbert import ModernBertAdapter
from earlyexit_kernels.models.roberta import RobertaAdapter

__all__ = [
    "SUPPORTED_MODELS",
    "adapter_class",
    "EncoderAdapterBase",
    "TanhPoolerHead",
    "BertAdapter",
    "AlbertAdapter",
    "RobertaAdapter",
    "DistilBertAdapter",
    "ElectraAdapter",
    "DebertaV2Adapter",
    "ModernBertAdapter",
]

SUPPORTED_MODELS: dict[type, type[EncoderAdapterBase]] = {
    BertForSequenceClassification: BertAdapter,
    AlbertForSequenceClassification: AlbertAdapter,
    RobertaForSequenceClassification: RobertaAdapter,
    XLMRobertaForSequenceClassification: RobertaAdapter,
    CamembertForSequenceClassification: RobertaAdapter,
    DistilBertForSequenceClassification: DistilBertAdapter,
    ElectraForSequenceClassification: ElectraAdapter,
    DebertaV2ForSequenceClassification: DebertaV2Adapter,
    ModernBertForSequenceClassification: ModernBertAdapter,
}


def adapter_class(model) -> type[EncoderAdapterBase]:
    """The adapter class of ``model`` (its class or a parent in :data:`SUPPORTED_MODELS`)."""
    for cls in type(model).__mro__:
        if cls in SUPPORTED_MODELS:
            return SUPPORTED_MODELS[cls]
    names = ", ".join(c.__name__ for c in SUPPORTED_MODELS)
    raise TypeError(f"eek.patch supports {names}; got {type(model).__name__}")
