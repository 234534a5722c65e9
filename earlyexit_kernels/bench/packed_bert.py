"""text-embeddings-inference's way, in-process: the unmodified BERT on packed tokens with varlen attention.

TEI concatenates a batch's tokens without padding (``[T, H]``, ``cu_seqlens`` marking where each
sequence starts), runs the projections, the feed-forward and the norms on the real tokens only,
and the attention through flash attention's varlen kernel, one sequence's keys per query. This
module does the same on a Hugging Face ``BertForSequenceClassification``'s own weights (not
patched: the peer a GPU user runs instead of early exit):

- :func:`packed_logits`: the classifier's logits of a packed batch (``[N, C]``);
- :func:`varlen_attention`: ``torch.nn.attention.varlen.varlen_attn`` (flash attention, CUDA) where
  torch has it and the device takes it, else :func:`varlen_attention_reference`, SDPA one sequence
  at a time (the CPU's rehearsal, and the reference its tests compare with).

It equals the model on the padded batch up to rounding (``python_tests/test_gpu_serving.py``).
"""

from __future__ import annotations

import torch

from earlyexit_kernels.engine.layers.varlen_attention import fused_varlen_available

__all__ = ["pack", "packed_logits", "varlen_attention", "varlen_attention_reference", "fused_varlen_available"]


def pack(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(ids [T], positions [T], cu_seqlens [N + 1] int32, longest)`` of ``sequences`` (token ids)
    concatenated without padding."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    return ids.to(device), positions.to(device), cu.to(device), int(lengths.max())


def varlen_attention_reference(q, k, v, cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
    """``[T, heads, d]``: each sequence's queries attend to its own keys (SDPA, one sequence at a time)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, heads, n, d] for SDPA
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, longest: int) -> torch.Tensor:
    """The fused varlen kernel where :func:`fused_varlen_available`, else the reference."""
    if fused_varlen_available(q.device, q.dtype, q.shape[-1]):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
    return varlen_attention_reference(q, k, v, cu_seqlens, longest)


@torch.no_grad()
def packed_logits(model, ids, positions, cu_seqlens, longest: int, attention=varlen_attention) -> torch.Tensor:
    """``model``'s (a ``BertForSequenceClassification``, eval mode) logits ``[N, C]`` for a packed batch
    (:func:`pack`): BERT's layers on the real tokens, the pooler and classifier on each sequence's first."""
    bert = model.bert
    embeddings = bert.embeddings
    hidden = embeddings.word_embeddings(ids) + embeddings.position_embeddings(positions)
    hidden = hidden + embeddings.token_type_embeddings(torch.zeros_like(ids))
    hidden = embeddings.LayerNorm(hidden)
    heads = model.config.num_attention_heads
    for layer in bert.encoder.layer:
        attention_self = layer.attention.self
        shape = (hidden.shape[0], heads, hidden.shape[1] // heads)
        q = attention_self.query(hidden).view(shape)
        k = attention_self.key(hidden).view(shape)
        v = attention_self.value(hidden).view(shape)
        context = attention(q, k, v, cu_seqlens, longest).reshape(hidden.shape)
        output = layer.attention.output
        hidden = output.LayerNorm(output.dense(context) + hidden)
        intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
        hidden = layer.output.LayerNorm(layer.output.dense(intermediate) + hidden)
    first = hidden[cu_seqlens[:-1].long()]
    pooled = bert.pooler.activation(bert.pooler.dense(first))
    return model.classifier(pooled)
