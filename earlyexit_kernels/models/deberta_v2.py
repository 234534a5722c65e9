"""``DebertaV2ForSequenceClassification`` (DeBERTa-v2 and v3): disentangled attention with relative
positions, the optional convolution after layer 1, the ``ContextPooler`` head.

The layers run as ``DebertaV2Encoder.forward`` runs them: the [n, 1, S, S] mask ``m_i m_j``
(``encoder.get_attention_mask``), the relative positions of the current length
(``encoder.get_rel_pos``, with ``position_buckets`` and ``max_relative_positions``; built once
for the longest input and sliced per length, so that the graphed step can capture the layers), the
relative embeddings (``encoder.get_rel_embedding``), built once per forward and again after
each compaction or trim (:class:`LayerInputs`), and after layer 1 the convolution
(``conv_kernel_size > 0``), which reads the layer's input and the 2-D mask. The embeddings are
multiplied by the mask, as Hugging Face does. The head is
``classifier(dropout(act(dense(dropout(h_cls)))))`` (``pooler_hidden_act``, GELU by default):
not the tanh pooler, so never fused (see :mod:`earlyexit_kernels.models.base`).
DeBERTa has its own attention code: only ``attn_implementation="eager"`` is accepted.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from earlyexit_kernels.models.base import EncoderAdapterBase


class DebertaV2Adapter(EncoderAdapterBase):
    attention_implementations = ("eager",)
    # run_layer is not ``layer_module(index)(hidden, mask)``: the continuous engine's compile=True refuses it.
    layer_call_is_module_call = False

    def __init__(self, model, heads):
        super().__init__(model, heads)
        config = model.config
        if config.pooler_hidden_size != config.hidden_size:
            raise ValueError(
                f"early exit needs pooler_hidden_size == hidden_size for DeBERTa (the exit heads read the "
                f"pooled vector); the config has {config.pooler_hidden_size} and {config.hidden_size}"
            )
        self.base = model.deberta
        if getattr(self.base, "z_steps", 0) > 1:
            raise ValueError("DeBERTa with z_steps > 1 re-runs its last layer; early exit does not support it")
        self.encoder = self.base.encoder
        self.pooler = model.pooler
        self.final_classifier = model.classifier
        self.classifier_dropout = model.dropout

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        return self.base.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            mask=attention_mask,
            inputs_embeds=inputs_embeds,
        )

    def layer_mask(self, mask, dtype):
        """What the layers take beside the hidden states until the batch next changes: the 2-D mask
        as integers (or None), and on first use the square mask, the relative positions and the
        relative embeddings, built once as ``DebertaV2Encoder.forward`` builds them once."""
        return LayerInputs(None if mask is None else mask.to(torch.long))

    def layer_module(self, index):
        return self.encoder.layer[index]

    def _build(self, hidden, inputs):
        mask = inputs.mask
        if mask is None:  # Hugging Face's default mask: every position
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        inputs.flat = mask
        inputs.square = self.encoder.get_attention_mask(mask)
        inputs.relative_pos = self._relative_positions(hidden)
        inputs.rel_embeddings = self.encoder.get_rel_embedding()
        inputs.shape = hidden.shape[:2]

    def _relative_positions(self, hidden):
        """``encoder.get_rel_pos(hidden)``, sliced from positions built once per device for the
        model's longest input. Hugging Face's ``make_log_bucket_position`` copies a host scalar to
        the device, a sync that no CUDA graph can capture; the position of query i and key j
        depends only on i - j and the config, so the [S, S] corner of the longest is the same
        tensor, read without a copy. Every tensor built stays (a captured graph reads it): one
        per device, and one more only for an input longer than ``max_position_embeddings``. They
        live on the encoder module, as long as the model (an adapter is made again after a patch,
        and graphs captured through the old one still read them)."""
        length = hidden.shape[-2]
        kept = self.encoder.__dict__.setdefault("earlyexit_relative_positions", {}).setdefault(hidden.device, [])
        for positions in kept:
            if positions.shape[-1] >= length:
                return positions[..., :length, :length]
        longest = max(length, getattr(self.model.config, "max_position_embeddings", 0) or 0)
        positions = self.encoder.get_rel_pos(hidden.new_empty(1, longest, 1))
        if positions is None:  # no relative attention
            return None
        kept.append(positions)
        return positions[..., :length, :length]

    def run_layer(self, index, hidden, attention_mask):
        inputs = attention_mask if isinstance(attention_mask, LayerInputs) else LayerInputs(attention_mask)
        if inputs.shape != hidden.shape[:2]:
            self._build(hidden, inputs)
        out, _ = self.encoder.layer[index](
            hidden, inputs.square, relative_pos=inputs.relative_pos, rel_embeddings=inputs.rel_embeddings
        )
        if index == 0 and self.encoder.conv is not None:
            out = self.encoder.conv(hidden, out, inputs.flat)
        return out

    def pool_cls(self, cls_hidden):
        # ContextPooler.forward on the [CLS] row, as it computes it
        pooler = self.pooler
        return ACT2FN[pooler.config.pooler_hidden_act](pooler.dense(pooler.dropout(cls_hidden)))


class LayerInputs:
    """One :meth:`DebertaV2Adapter.layer_mask`: the 2-D mask, and what is built from it for hidden
    states of ``shape`` [n, S]. The engine asks for a new one whenever rows leave or padding is
    trimmed, and every forward starts with a new one, so nothing outlives the forward that
    passed the mask (nor the parameters the relative embeddings were computed from)."""

    def __init__(self, mask):
        self.mask = mask
        self.shape = None
        self.flat = self.square = self.relative_pos = self.rel_embeddings = None
