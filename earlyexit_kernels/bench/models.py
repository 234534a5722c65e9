"""The models the suite runs: architecture x size preset, random weights, eval mode.

Sizes:

- ``base``: the BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072), the GPU default;
- ``small``: 12 layers, hidden 128, 2 heads of 64, FFN 512, the CPU default (the BERT-base
  shape takes about 25 s per forward at B=128, S=128 on two CPU cores; this keeps the layer
  count and head size, so exit patterns and syncs per layer are those of BERT-base, at about
  1/30 of the compute, which makes the engine's per-layer overhead relatively larger);
- ``tiny``: 4 layers, hidden 32 (the smoke run: checks that the suite runs, times nothing).

Architectures (each ``*ForSequenceClassification``, the size preset's layers, hidden size,
heads and feed-forward size):

- ``bert``, ``albert`` (embedding size ``min(128, hidden)``), ``roberta`` (pad token 1);
- ``distilbert``: ``DistilBertConfig`` (``n_layers``, ``dim``, ``n_heads``, ``hidden_dim``);
  no token types, a ReLU head that is never fused;
- ``deberta_v3``: ``DebertaV2Config`` in the DeBERTa-v3 shape (relative attention with 256
  log buckets over ``max_position_embeddings``, ``p2c`` and ``c2p``, shared keys, layer-normed
  relative embeddings, no absolute positions, no token types). This package runs DeBERTa's
  own attention code, eager only (:func:`attention_for`): every method, the full model too;
- ``modernbert``: ``ModernBertConfig`` with its defaults for attention (a global layer every
  3, the others a sliding window of 128 tokens, 64 each side) and rotary positions; pad, bos/cls and eos/sep
  token ids moved inside the vocabulary (its defaults are those of its 50368-token one); no
  token types; ``intermediate`` is the width of its gated MLP (``Wi`` has twice that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

__all__ = ["SIZES", "ARCHITECTURES", "ModelSize", "attention_for", "build_model", "pad_token_id"]


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

ARCHITECTURES = ("bert", "albert", "roberta", "distilbert", "deberta_v3", "modernbert")

#: the padding token of each architecture's config (the inputs pad with it).
PAD_TOKEN_IDS = {"bert": 0, "albert": 0, "roberta": 1, "distilbert": 0, "deberta_v3": 0, "modernbert": 0}

#: the attention implementations each architecture runs in this package (the first is used
#: when the requested one is not among them).
ATTENTION = {"deberta_v3": ("eager",)}


def pad_token_id(arch: str) -> int:
    return PAD_TOKEN_IDS[arch]


def attention_for(arch: str, requested: str) -> str:
    """The attention implementation ``arch`` runs with when ``requested`` is asked for.

    DeBERTa-v2/v3 has its own attention code, which this package runs eagerly only: it runs
    with ``"eager"`` whatever is requested (the full model too, so that ratios compare like
    with like); the CSV's ``attn`` column says so.
    """
    allowed = ATTENTION.get(arch, ("eager", "sdpa"))
    return requested if requested in allowed else allowed[0]


def build_model(
    arch: str, size: ModelSize, max_len: int, *, device: str, dtype: torch.dtype, attn: str, seed: int = 0
) -> torch.nn.Module:
    """A random-init ``*ForSequenceClassification`` with 2 labels, in eval mode, on ``device`` in ``dtype``.

    ``attn`` is passed through :func:`attention_for` (DeBERTa-v3: always ``"eager"``).
    """
    torch.manual_seed(seed)
    attn = attention_for(arch, attn)
    pad = pad_token_id(arch)
    shape = dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        num_labels=2,
    )
    common = dict(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
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
        config = RobertaConfig(pad_token_id=pad, max_position_embeddings=max(514, max_len + 2), **common)
        model = RobertaForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "distilbert":
        config = DistilBertConfig(
            vocab_size=size.vocab,
            dim=size.hidden,
            n_layers=size.layers,
            n_heads=size.heads,
            hidden_dim=size.intermediate,
            max_position_embeddings=max(512, max_len),
            num_labels=2,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            pad_token_id=pad,
        )
        model = DistilBertForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "deberta_v3":
        config = DebertaV2Config(
            relative_attention=True,
            position_buckets=256,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            max_relative_positions=-1,
            position_biased_input=False,
            type_vocab_size=0,
            max_position_embeddings=max(512, max_len),
            pooler_hidden_size=size.hidden,
            pooler_dropout=0.0,
            pad_token_id=pad,
            **common,
        )
        model = DebertaV2ForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "modernbert":
        config = ModernBertConfig(
            **shape,
            max_position_embeddings=max(512, max_len),
            pad_token_id=pad,
            bos_token_id=1,
            cls_token_id=1,
            eos_token_id=2,
            sep_token_id=2,
        )
        model = ModernBertForSequenceClassification._from_config(config, attn_implementation=attn)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return model.to(device=device, dtype=dtype).eval()
