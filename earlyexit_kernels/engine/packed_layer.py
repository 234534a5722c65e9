"""A BERT-style encoder layer run on its valid tokens only ("packed"), attention on the padded grid.

A BERT-style layer (BERT, RoBERTa, XLM-R, ELECTRA: ``attention.self`` with ``query``/``key``/
``value``, ``attention.output``, ``intermediate``, ``output``) is token-wise everywhere but in
the attention's score-and-mix. :func:`run_packed` runs the projections, the feed-forward and the
norms on the ``T`` valid tokens [T, H] instead of the ``n x S`` padded positions, and scatters
only the query/key/value projections onto the padded grid for the attention, which runs through
the model's own attention function (``config._attn_implementation``) with the layer's mask.
Where a call pads much (a batch with one long row), the token-wise work shrinks by the padding.

The result is the layer's, up to the rounding of matrix products over a different row count;
positions that are padding hold zeros.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["has_forward_hooks", "run_packed", "splits_into_token_parts"]


def splits_into_token_parts(layer: nn.Module) -> bool:
    """Whether ``layer`` has the BERT-style structure :func:`run_packed` runs (and no cross-attention,
    no relative positions)."""
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (
        self_attention is not None
        and all(isinstance(getattr(self_attention, name, None), nn.Module) for name in ("query", "key", "value"))
        and hasattr(self_attention, "attention_head_size")
        and hasattr(self_attention, "scaling")
        and isinstance(getattr(attention, "output", None), nn.Module)
        and isinstance(getattr(layer, "intermediate", None), nn.Module)
        and isinstance(getattr(layer, "output", None), nn.Module)
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "chunk_size_feed_forward", 0)
        and not getattr(self_attention, "is_causal", False)
        # older transformers: relative position scores inside the attention, or no attention interface
        and not hasattr(self_attention, "distance_embedding")
        and getattr(getattr(self_attention, "config", None), "position_embedding_type", "absolute") == "absolute"
        and hasattr(sys.modules.get(type(self_attention).__module__), "eager_attention_forward")
    )


def has_forward_hooks(layer: nn.Module) -> bool:
    """Whether calling ``layer`` runs forward hooks (its own or global ones) that would do something:
    a packed call would skip them. transformers' own output-capturing hook (installed on every layer
    at a model's first forward) does nothing outside a forward that collects hidden states."""
    from torch.nn.modules import module as torch_module

    hooks = [
        *layer._forward_hooks.values(),
        *layer._forward_pre_hooks.values(),
        *torch_module._global_forward_hooks.values(),
        *torch_module._global_forward_pre_hooks.values(),
    ]
    return any(not _idle_output_capture(hook) for hook in hooks)


def _idle_output_capture(hook) -> bool:
    """Whether ``hook`` is transformers' output-capturing hook with no collection under way."""
    module = sys.modules.get(getattr(hook, "__module__", None) or "")
    if getattr(hook, "__name__", None) != "output_capturing_hook" or module is None:
        return False
    collector = getattr(module, "_active_collector", None)
    return collector is not None and not collector.get()  # None, or {}: nothing to collect


def _attention_function(self_attention: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(self_attention).__module__].eager_attention_forward
    implementation = self_attention.config._attn_implementation
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def run_packed(layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer_mask) -> torch.Tensor:
    """``layer`` on ``hidden`` [n, S, H] computed at the flat ``positions`` [T] (of ``n * S``) only.

    ``layer_mask``: the mask the layer takes (see ``EncoderAdapterBase.layer_mask``), which must
    mask every position outside ``positions``. Returns [n, S, H], zeros outside ``positions``.
    """
    n, length, width = hidden.shape
    tokens = hidden.reshape(n * length, width).index_select(0, positions)  # [T, H]
    self_attention = layer.attention.self
    head_size = self_attention.attention_head_size
    projected = torch.cat(
        [self_attention.query(tokens), self_attention.key(tokens), self_attention.value(tokens)], dim=1
    )  # [T, 3 * heads * head_size]
    grid = projected.new_zeros(n * length, projected.shape[1]).index_copy_(0, positions, projected)
    query, key, value = (
        part.view(n, length, -1, head_size).transpose(1, 2) for part in grid.view(n, length, 3, -1).unbind(2)
    )
    mixed, _ = _attention_function(self_attention)(
        self_attention, query, key, value, layer_mask, dropout=0.0, scaling=self_attention.scaling
    )  # [n, S, heads, head_size]
    mixed = mixed.reshape(n * length, -1).index_select(0, positions)
    attended = layer.attention.output(mixed, tokens)
    out = layer.output(layer.intermediate(attended), attended)  # [T, H]
    return out.new_zeros(n * length, width).index_copy_(0, positions, out).view(n, length, width)
