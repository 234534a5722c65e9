"""``BertForSequenceClassification``: BERT's pooler (dense + tanh on [CLS]), fused on fast backends."""

from __future__ import annotations

from earlyexit_kernels.models.base import EncoderAdapterBase, TanhPoolerHead


class BertAdapter(TanhPoolerHead, EncoderAdapterBase):
    def __init__(self, model, heads):
        super().__init__(model, heads)
        self.base = model.bert
        self.final_classifier = model.classifier
        self.classifier_dropout = model.dropout
        self.pooler_linear = self.base.pooler.dense

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        return self.base.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )

    def layer_module(self, index):
        """The module that runs encoder layer ``index`` (0-based): ``run_layer`` calls it."""
        return self.base.encoder.layer[index]

    def pool_cls(self, cls_hidden):
        return self.base.pooler.activation(self.base.pooler.dense(cls_hidden))
