"""The model and stream the audit's cost benchmarks share (``audit_cost.py``, ``recertify_cost.py``).

A random BERT of 12 layers, hidden 128, its heads perturbed, its Entropy threshold set so that
about half the layers run; ``count`` sequences of 8-128 random token ids (seeded).
"""

import statistics

import torch
from transformers import BertConfig, BertForSequenceClassification

import earlyexit_kernels as eek


def model_and_stream(count: int):
    """``(model patched with the threshold found, the sequences, the threshold's Entropy policy)``."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=256,
        num_labels=2,
    )
    model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    eek.patch(model, eek.Entropy(0.0))
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn_like(head.weight) * 2.0)
    g = torch.Generator().manual_seed(1)
    items = [
        {"input_ids": torch.randint(5, 1000, (int(torch.randint(8, 129, (1,), generator=g)),), generator=g).tolist()}
        for _ in range(count)
    ]
    # threshold: the one whose mean exit layer is about half the layers
    sample = items[:256]
    low, high = 0.0, 0.7
    for _ in range(12):
        t = (low + high) / 2
        eek.patch(model, eek.Entropy(t))
        mean = statistics.mean(p.exit_layer for p in eek.classify(model, sample, max_batch_size=32))
        low, high = (t, high) if mean > 6 else (low, t)
    policy = eek.Entropy(t)
    eek.patch(model, policy)
    return model, items, policy
