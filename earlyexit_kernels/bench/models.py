"""The models the suite runs: architecture x size preset, random weights, eval mode.

Sizes:

- ``base``: the BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072), the GPU default;
- ``small``: 12 layers, hidden 128, 2 heads of 64, FFN 512, the CPU default (the BERT-base
  shape takes about 25 s per forward at B=128, S=128 on two CPU cores; this keeps the layer
  count and head size, so exit patterns and syncs per layer are those of BERT-base, at about
  1/30 of the compute, which makes the engine's per-layer overhead relatively larger);
- ``tiny``: 4 layers, hidden 32 (the smoke run: checks that the suite runs, times nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

__all__ = ["SIZES", "ModelSize", "build_model", "pad_token_id"]


@dataclass(frozen=True)
class ModelSize:
    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int = 30522

    @property
    def label(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-I{self.intermediate}"


SIZES = {
    "base": ModelSize("base", 12, 768, 12, 3072),
    "small": ModelSize("small", 12, 128, 2, 512),
    "tiny": ModelSize("tiny", 4, 32, 2, 64, vocab=97),
}

ARCHITECTURES = ("bert", "albert", "roberta")


def pad_token_id(arch: str) -> int:
    return 1 if arch == "roberta" else 0


def build_model(
    arch: str, size: ModelSize, max_len: int, *, device: str, dtype: torch.dtype, attn: str, seed: int = 0
) -> torch.nn.Module:
    """A random-init ``*ForSequenceClassification`` with 2 labels, in eval mode, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "bert":
        model = BertForSequenceClassification._from_config(
            BertConfig(max_position_embeddings=max(512, max_len), **common), attn_implementation=attn
        )
    elif arch == "albert":
        config = AlbertConfig(
            embedding_size=min(128, size.hidden),
            max_position_embeddings=max(512, max_len),
            classifier_dropout_prob=0.0,
            **common,
        )
        model = AlbertForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "roberta":
        config = RobertaConfig(pad_token_id=1, max_position_embeddings=max(514, max_len + 2), **common)
        model = RobertaForSequenceClassification._from_config(config, attn_implementation=attn)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return model.to(device=device, dtype=dtype).eval()
