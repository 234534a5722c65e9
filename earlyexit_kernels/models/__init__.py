"""The supported encoder families: one adapter per Hugging Face sequence classifier.

``SUPPORTED_MODELS`` maps each Hugging Face class to its adapter; :func:`adapter_class`
finds the adapter of a model (``TypeError`` naming the supported classes otherwise).

Nothing here imports a Hugging Face modeling module: those take seconds (each pulls in
``transformers.modeling_utils``), and ``import earlyexit_kernels`` must stay fast. The
mapping knows the classes by name and imports one when it is looked up or iterated; a
model passed to :func:`adapter_class` has imported its own already. The DeBERTa-v2,
ModernBERT and MPNet adapters, which import parts of ``transformers`` at import, load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from earlyexit_kernels.models.albert import AlbertAdapter
from earlyexit_kernels.models.base import EncoderAdapterBase, TanhPoolerHead
from earlyexit_kernels.models.bert import BertAdapter
from earlyexit_kernels.models.distilbert import DistilBertAdapter
from earlyexit_kernels.models.electra import ElectraAdapter
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
    "MPNetAdapter",
]

#: Hugging Face class name -> (family name, adapter module under earlyexit_kernels.models, adapter class name).
#: The family names are those the documents and the error messages use.
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "BertForSequenceClassification": ("BERT", "bert", "BertAdapter"),
    "AlbertForSequenceClassification": ("ALBERT", "albert", "AlbertAdapter"),
    "RobertaForSequenceClassification": ("RoBERTa", "roberta", "RobertaAdapter"),
    "XLMRobertaForSequenceClassification": ("XLM-RoBERTa", "roberta", "RobertaAdapter"),
    "CamembertForSequenceClassification": ("CamemBERT", "roberta", "RobertaAdapter"),
    "DistilBertForSequenceClassification": ("DistilBERT", "distilbert", "DistilBertAdapter"),
    "ElectraForSequenceClassification": ("ELECTRA", "electra", "ElectraAdapter"),
    "DebertaV2ForSequenceClassification": ("DeBERTa-v2", "deberta_v2", "DebertaV2Adapter"),
    "ModernBertForSequenceClassification": ("ModernBERT", "modernbert", "ModernBertAdapter"),
    "MPNetForSequenceClassification": ("MPNet", "mpnet", "MPNetAdapter"),
}

#: adapters whose modules are imported on first use
_LAZY_ADAPTERS = {"DebertaV2Adapter": "deberta_v2", "ModernBertAdapter": "modernbert", "MPNetAdapter": "mpnet"}


def _adapter(class_name: str) -> type[EncoderAdapterBase]:
    _, module, adapter = _FAMILIES[class_name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), adapter)


def _hugging_face_class(class_name: str) -> type:
    import transformers

    return getattr(transformers, class_name)


class SupportedModels(Mapping):
    """Hugging Face class -> the adapter class that runs it (a read-only mapping).

    Looking a class up compares it with the ``transformers`` class of the same name (so a
    subclass or a look-alike of another module is not a key); iterating imports every
    family's modeling module.
    """

    def names(self) -> tuple[str, ...]:
        """The supported class names, without importing anything."""
        return tuple(_FAMILIES)

    def families(self) -> dict[str, str]:
        """Class name -> the family's name (``"DeBERTa-v2"``), in the order of :meth:`names`, without importing anything."""
        return {name: family for name, (family, _, _) in _FAMILIES.items()}

    def __getitem__(self, cls) -> type[EncoderAdapterBase]:
        name = getattr(cls, "__name__", None)
        if name not in _FAMILIES or not str(getattr(cls, "__module__", "")).startswith("transformers."):
            raise KeyError(cls)
        if _hugging_face_class(name) is not cls:
            raise KeyError(cls)
        return _adapter(name)

    def __iter__(self) -> Iterator[type]:
        return (_hugging_face_class(name) for name in _FAMILIES)

    def __len__(self) -> int:
        return len(_FAMILIES)

    def __repr__(self) -> str:
        return f"SupportedModels({', '.join(_FAMILIES)})"


SUPPORTED_MODELS = SupportedModels()


def adapter_class(model) -> type[EncoderAdapterBase]:
    """The adapter class of ``model`` (its class or a parent in :data:`SUPPORTED_MODELS`)."""
    for cls in type(model).__mro__:
        if cls in SUPPORTED_MODELS:
            return SUPPORTED_MODELS[cls]
    raise TypeError(f"eek.patch supports {', '.join(_FAMILIES)}; got {type(model).__name__}")


def __getattr__(name: str):
    if name in _LAZY_ADAPTERS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_ADAPTERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
