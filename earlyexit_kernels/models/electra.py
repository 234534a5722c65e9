"""``ElectraForSequenceClassification``: ``embeddings_project`` when ``embedding_size != hidden_size``;
the head is ``out_proj(dropout(gelu(dense(dropout(h_cls)))))``. GELU, not tanh: never fused
(see :mod:`earlyexit_kernels.models.base`)."""

from __future__ import annotations

from earlyexit_kernels.models.base import EncoderAdapterBase


class ElectraAdapter(EncoderAdapterBase):
    def __init__(self, model, heads):
        super().__init__(model, heads)
        self.base = model.electra
        self.head = model.classifier
        self.final_classifier = model.classifier.out_proj
        self.classifier_dropout = model.classifier.dropout

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        embeddings = self.base.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        if hasattr(self.base, "embeddings_project"):
            embeddings = self.base.embeddings_project(embeddings)
        return embeddings

    def layer_module(self, index):
        return self.base.encoder.layer[index]

    def pool_cls(self, cls_hidden):
        return self.head.activation(self.head.dense(self.head.dropout(cls_hidden)))
