"""``DebertaV2ForSequenceClassification`` (DeBERTa-v2 and v3): disentangled attention with relative
positions, the optional convolution after layer 1, the ``ContextPooler`` head.

The layers run as ``DebertaV2Encoder.forward`` runs them: the [n, 1, S, S] mask ``m_i m_j``
(``encoder.get_attention_mask``), the relative positions of the current length
(``encoder.get_rel_pos``, with ``position_buckets`` and ``max_relative_positions``), the
relative embeddings (``encoder.get_rel_embedding``), and after layer 1 the convolution
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
        """The 2-D mask as integers (or None): ``run_layer`` builds the square mask and positions from it."""
        return None if mask is None else mask.to(torch.long)

    def layer_module(self, index):
        return self.encoder.layer[index]

    def run_layer(self, index, hidden, attention_mask):
        if attention_mask is None:  # Hugging Face's default mask: every position
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        square = self.encoder.get_attention_mask(attention_mask)
        relative_pos = self.encoder.get_rel_pos(hidden)
        out, _ = self.encoder.layer[index](
            hidden, square, relative_pos=relative_pos, rel_embeddings=self.encoder.get_rel_embedding()
        )
        if index == 0 and self.encoder.conv is not None:
            out = self.encoder.conv(hidden, out, attention_mask)
        return out

    def pool_cls(self, cls_hidden):
        # ContextPooler.forward on the [CLS] row, as it computes it
        pooler = self.pooler
        return ACT2FN[pooler.config.pooler_hidden_act](pooler.dense(pooler.dropout(cls_hidden)))
