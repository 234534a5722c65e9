"""``MPNetForSequenceClassification`` (all-mpnet-base-v2 and its fine-tunes): BERT-like layers with a
relative position bias added to every layer's attention scores, RoBERTa's classification head.

The layers run as ``MPNetEncoder.forward`` runs them: each takes the additive mask Hugging Face
builds (``create_bidirectional_mask``) and the position bias ``[1, heads, S, S]`` of the current
length. The bias depends on the positions only (bucketed ``j - i``), so the bias of a shorter
length is the top-left block of a longer one's: rows leaving and padding trimmed take a slice of
it, the same values the unpatched model adds. In eval mode without gradients the bias of the
longest length seen is kept between forwards (rebuilt when the bias weights change, which bumps
their version); when gradients flow it is built once per forward from the weights, so training
reaches them. The head is RoBERTa's (dense + tanh + out_proj on the first token): fused on fast
backends. The model was pre-trained with mean pooling, so its internal exit heads pool the
masked mean by default. MPNet has its own attention code: only ``attn_implementation="eager"``.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask

from earlyexit_kernels.models.base import EncoderAdapterBase
from earlyexit_kernels.models.roberta import RobertaAdapter


class MPNetAdapter(RobertaAdapter):
    attention_implementations = ("eager",)
    uses_token_type_ids = False
    # run_layer passes the position bias: the continuous engine's compile=True refuses it.
    layer_call_is_module_call = False

    def __init__(self, model, heads):
        EncoderAdapterBase.__init__(self, model, heads)
        self.base = model.mpnet
        self.encoder = self.base.encoder
        self.head = model.classifier
        self.final_classifier = model.classifier.out_proj
        self.classifier_dropout = model.classifier.dropout
        self.pooler_linear = model.classifier.dense
        self._bias_table: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def default_pooling(cls, config) -> str:
        return "mean"

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        return self.base.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)

    def layer_mask(self, mask, dtype):
        """What the layers take beside the hidden states until the batch next changes: the 2-D mask
        [n, S] (or None), and on first use the additive mask and the position bias of length S."""
        return LayerInputs(mask)

    def layer_module(self, index):
        return self.encoder.layer[index]

    def position_bias(self, hidden: torch.Tensor) -> torch.Tensor:
        """The relative position bias ``[1, heads, S, S]`` for ``hidden`` [n, S, H], as ``compute_position_bias``."""
        length = hidden.shape[1]
        weight = self.encoder.relative_attention_bias.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return self.encoder.compute_position_bias(hidden[:1])
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        cached = self._bias_table
        if cached is None or cached[0] != key or cached[1].shape[-1] < length:
            longest = max(length, cached[1].shape[-1] if cached is not None and cached[0] == key else 0)
            with torch.no_grad():
                table = self.encoder.compute_position_bias(hidden.new_empty(1, longest, 0))
            self._bias_table = cached = (key, table)
        return cached[1][:, :, :length, :length]

    def _build(self, hidden, inputs):
        inputs.square = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=inputs.mask
        )
        inputs.bias = self.position_bias(hidden)
        inputs.shape = hidden.shape[:2]

    def run_layer(self, index, hidden, attention_mask):
        inputs = attention_mask if isinstance(attention_mask, LayerInputs) else LayerInputs(attention_mask)
        if inputs.shape != hidden.shape[:2]:
            self._build(hidden, inputs)
        return self.encoder.layer[index](hidden, inputs.square, inputs.bias)[0]


class LayerInputs:
    """One :meth:`MPNetAdapter.layer_mask`: the 2-D mask, and the additive mask and position bias
    built for hidden states of ``shape`` [n, S]. The engine asks for a new one whenever rows leave
    or padding is trimmed, and every forward starts with a new one: nothing built from a mask
    outlives the forward that passed it."""

    def __init__(self, mask):
        self.mask = mask
        self.shape = None
        self.square = self.bias = None
