"""RoBERTa, XLM-RoBERTa and CamemBERT sequence classifiers: the same structure (``model.roberta``,
a classification head dense + tanh + out_proj on [CLS]), fused on fast backends."""

from __future__ import annotations

import torch

from earlyexit_kernels.models.base import EncoderAdapterBase
from earlyexit_kernels.models.bert import BertAdapter


class RobertaAdapter(BertAdapter):
    def __init__(self, model, heads):
        EncoderAdapterBase.__init__(self, model, heads)
        self.base = model.roberta
        self.head = model.classifier
        self.final_classifier = model.classifier.out_proj
        self.classifier_dropout = model.classifier.dropout
        self.pooler_linear = model.classifier.dense

    def pool_cls(self, cls_hidden):
        return torch.tanh(self.head.dense(self.head.dropout(cls_hidden)))
