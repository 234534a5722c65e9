"""Shared fixtures: tiny random BERT, ALBERT and RoBERTa classifiers and their inputs."""

import os

import torch

# Triton kernels run in Triton's interpreter when there is no GPU; this must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 97
ARCHITECTURES = ("bert", "albert", "roberta")


def tiny_model(arch: str = "bert", *, num_labels: int = 3, num_layers: int = 4, attn: str = "eager", seed: int = 0):
    """A small random sequence classifier in eval mode (hidden 32, 2 heads)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if arch == "bert":
        model = BertForSequenceClassification._from_config(BertConfig(**common), attn_implementation=attn)
    elif arch == "albert":
        config = AlbertConfig(embedding_size=16, num_hidden_groups=2, classifier_dropout_prob=0.0, **common)
        model = AlbertForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "roberta":
        config = RobertaConfig(pad_token_id=1, **common)
        model = RobertaForSequenceClassification._from_config(config, attn_implementation=attn)
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_batch(batch: int = 6, seq_len: int = 12, *, seed: int = 1, padded: bool = True):
    """Random ids, a right-padded mask (row 0 always full length) and token types."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        lengths = torch.randint(2, seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    token_types = torch.randint(0, 2, (batch, seq_len), generator=generator)
    return ids, mask, token_types


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
