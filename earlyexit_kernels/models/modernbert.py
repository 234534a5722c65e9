"""``ModernBertForSequenceClassification``: rotary position embeddings, local (sliding-window)
and global attention layers (``config.layer_types``), the final norm, ``classifier_pooling``
``"cls"`` or ``"mean"``.

The layers run as ``ModernBertModel.forward`` runs them: each layer gets the mask of its type,
built by Hugging Face's own ``create_bidirectional_mask`` / ``create_bidirectional_sliding_window_mask``
from the current 2-D mask, and the rotary ``(cos, sin)`` of its type for positions ``0..S-1``;
both are built once per forward and again when the batch is compacted or trimmed (:class:`LayerInputs`).
The exit head at a layer is by default the model's head on that layer's output:
``classifier_i(drop(head(pool(final_norm(h)))))``, where ``pool`` is the [CLS] row or the mean
over the valid tokens (``classifier_pooling`` by default, ``pooling=`` of ``eek.patch`` otherwise). Not the tanh pooler, so never fused (see :mod:`earlyexit_kernels.models.base`).
Accepted attention: eager and SDPA (flash attention would need the unpadded layout).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from earlyexit_kernels.models.base import EncoderAdapterBase


class ModernBertAdapter(EncoderAdapterBase):
    uses_token_type_ids = False
    # run_layer passes the rotary embeddings: the continuous engine's compile=True refuses it.
    layer_call_is_module_call = False

    def __init__(self, model, heads):
        super().__init__(model, heads)
        config = model.config
        if config.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {config.classifier_pooling!r}")
        self.base = model.model
        self.head = model.head
        self.final_classifier = model.classifier
        self.classifier_dropout = model.drop
        self.mean_pooling = config.classifier_pooling == "mean"

    def embed(self, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask=None):
        if position_ids is not None:
            raise ValueError("early exit runs ModernBERT with positions 0..S-1; leave position_ids out")
        return self.base.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)

    def layer_mask(self, mask, dtype):
        """What the layers take beside the hidden states until the batch next changes: the 2-D mask
        [n, S] (or None), and on first use each layer type's mask and rotary table built from it."""
        return LayerInputs(mask)

    def layer_module(self, index):
        return self.base.layers[index]

    def _build(self, hidden, inputs):
        kwargs = {"config": self.model.config, "inputs_embeds": hidden, "attention_mask": inputs.mask}
        inputs.masks = {
            "full_attention": create_bidirectional_mask(**kwargs),
            "sliding_attention": create_bidirectional_sliding_window_mask(**kwargs),
        }
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        inputs.rotary = {t: self.base.rotary_emb(hidden, positions, t) for t in set(self.model.config.layer_types)}
        inputs.shape = hidden.shape[:2]

    def run_layer(self, index, hidden, attention_mask):
        inputs = attention_mask if isinstance(attention_mask, LayerInputs) else LayerInputs(attention_mask)
        if inputs.shape != hidden.shape[:2]:
            self._build(hidden, inputs)
        layer = self.base.layers[index]
        kind = layer.attention_type
        return layer(hidden, attention_mask=inputs.masks[kind], position_embeddings=inputs.rotary[kind])

    @classmethod
    def default_pooling(cls, config) -> str:
        return config.classifier_pooling

    def token_vectors(self, hidden):
        return self.base.final_norm(hidden)

    def pool_vector(self, pooled):
        return self.head(pooled)

    def pool(self, hidden, mask=None):
        if not self.mean_pooling:
            return self.head(self.base.final_norm(hidden[:, 0]))
        hidden = self.base.final_norm(hidden)
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.bool)
        return self.head((hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True))


class LayerInputs:
    """One :meth:`ModernBertAdapter.layer_mask`: the 2-D mask, and the masks and rotary tables built
    from it for hidden states of ``shape`` [n, S].

    The engine asks for a new one whenever rows leave or padding is trimmed, and every forward
    starts with a new one: nothing built from a mask outlives the forward that passed it (a
    caller may refill the same mask tensor in place for its next batch).
    """

    def __init__(self, mask):
        self.mask = mask
        self.shape = None
        self.masks = None
        self.rotary = None
