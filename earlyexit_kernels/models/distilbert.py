"""``DistilBertForSequenceClassification``: no pooler and no token types; the head is
``classifier(dropout(relu(pre_classifier(h_cls))))``. Not a tanh pooler, so never fused
(see :mod:`earlyexit_kernels.models.base`)."""

from __future__ import annotations

import torch

from earlyexit_kernels.models.base import EncoderAdapterBase


class DistilBertAdapter(EncoderAdapterBase):
    uses_token_type_ids = False

    def __init__(self, model, heads):
        super().__init__(model, heads)
        self.base = model.distilbert
        self.pre_classifier = model.pre_classifier
        self.final_classifier = model.classifier
        self.classifier_dropout = model.dropout

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        # token_type_ids: refused by the patched forward when given; the continuous engine passes zeros.
        return self.base.embeddings(input_ids, inputs_embeds, position_ids)

    def layer_module(self, index):
        return self.base.transformer.layer[index]

    def pool_cls(self, cls_hidden):
        return torch.relu(self.pre_classifier(cls_hidden))
