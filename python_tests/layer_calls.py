"""An encoder layer called as its encoder calls it, on padded rows: what the tests of the layers a runtime runs
from its graph (``test_ort_layer.py``, ``test_ov_layer.py``) compare against the torch layer."""

import torch
from conftest import tiny_model, tiny_mpnet

MODELS = {"bert": lambda: tiny_model("bert", num_layers=2), "bert-sdpa": lambda: tiny_model("bert", num_layers=2, attn="sdpa"), "mpnet": tiny_mpnet}  # fmt: skip


def padded_input(n=5, length=11, hidden=32, seed=0):
    """Hidden states [n, S, H] and the 2-D mask of rows of lengths 3..S (the first full)."""
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(n, length, hidden, generator=generator)
    lengths = torch.randint(3, length + 1, (n,), generator=generator)
    lengths[0] = length
    return hidden_states, torch.arange(length)[None] < lengths[:, None]


def additive(mask):
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]


def run(layer, model, hidden, mask):
    """The layer's output on ``hidden`` with ``mask``, as its encoder calls it; padding zeroed."""
    with torch.no_grad():
        if model.config.model_type == "mpnet":
            bias = model.base_model.encoder.compute_position_bias(hidden)
            out = layer(hidden, additive(mask), bias)[0]
        else:
            out = layer(hidden, additive(mask))
    return out * mask[..., None]
