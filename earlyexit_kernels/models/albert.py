"""``AlbertForSequenceClassification``: shared layer groups, the embedding projection, the tanh
pooler on [CLS] (fused on fast backends)."""

from __future__ import annotations

from earlyexit_kernels.models.base import EncoderAdapterBase, TanhPoolerHead


class AlbertAdapter(TanhPoolerHead, EncoderAdapterBase):
    def __init__(self, model, heads):
        super().__init__(model, heads)
        self.base = model.albert
        self.final_classifier = model.classifier
        self.classifier_dropout = model.dropout
        self.layers_per_group = self.num_layers / model.config.num_hidden_groups
        self.pooler_linear = self.base.pooler

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        embeddings = self.base.embeddings(
            input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
        )
        return self.base.encoder.embedding_hidden_mapping_in(embeddings)

    def layer_module(self, index):
        """The layer group that runs encoder layer ``index`` (0-based): ALBERT shares it between layers."""
        return self.base.encoder.albert_layer_groups[int(index / self.layers_per_group)]

    def pool_cls(self, cls_hidden):
        return self.base.pooler_activation(self.base.pooler(cls_hidden))
