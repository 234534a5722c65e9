"""The shared part of the architecture adapters.

An adapter tells the engine (:mod:`earlyexit_kernels.engine.step.batch_loop`, :mod:`earlyexit_kernels.engine.engines.continuous.engine`)
how to embed a batch, build the mask a layer takes, run encoder layer ``i``, pool and classify,
for one Hugging Face family, exactly as that family's own forward does.

Fused heads: the fast backends (cpp, triton, cuda) fuse the exit head with the exit step, and
their kernels implement one head only: ``logits = W_i tanh(W_p x + b_p) + b_i`` on the [CLS]
row ``x`` (BERT's and ALBERT's pooler, RoBERTa's classification head). A family whose head has
exactly that form mixes in :class:`TanhPoolerHead`, which provides ``head_weights``; the engine
fuses only when an adapter has ``head_weights`` (:func:`earlyexit_kernels.engine.step.batch_loop.can_fuse_head`).
Every other head (DistilBERT's ReLU, ELECTRA's GELU) has no ``head_weights``: its head runs in
PyTorch (``pool`` then ``classify``) and the backend's ``exit_step`` takes the decision, which
every backend has. Giving such a family ``head_weights`` would silently compute a tanh pooler
that the model does not have.

Exit inputs: the internal head of layer ``i < L`` is ``classify(i, exit_input(i, hidden, mask))``.
``exit_input`` pools the layer's token vectors (``pooled_hidden``: the [CLS] row or the masked
mean, after the family's final norm where it has one) and, for the ``"model"`` head form,
applies the model's own pooler to it (``pool_vector``); for the ``"mlp"`` and ``"cascade"``
forms it is the pooled token vector itself. It holds no trainable head parameter: those belong
to ``classify`` (``heads.classifiers[i - 1]``; a ``"cascade"`` head also reads the logits of
the head below, ``classify(i, x, below=z)``, which the engine carries per row). Layer ``L``
always reads the model's own ``pool``. The fused kernels take ``pooled_hidden`` (any row
stride) in place of the [CLS] row.
"""

from __future__ import annotations

import torch
from torch import nn

from earlyexit_kernels.backends.compaction import layer_attention_mask
from earlyexit_kernels.backends.pooled_head import FusedExitHead, masked_mean
from earlyexit_kernels.engine.layers.module_weights import plain_float
from earlyexit_kernels.engine.step.heads import CascadeExitHead, ExitHeads, MLPExitHead

__all__ = ["EncoderAdapterBase", "TanhPoolerHead", "masked_mean"]


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is not None and plain_float(module.weight)


class EncoderAdapterBase:
    """Shared part of the architecture adapters (see :class:`earlyexit_kernels.engine.step.batch_loop.EncoderAdapter`).

    A subclass sets ``final_classifier`` (the model's own last linear layer) and
    ``classifier_dropout`` and defines ``embed(input_ids, token_type_ids, position_ids,
    inputs_embeds, attention_mask=None)`` (the 2-D mask, for families whose embeddings read
    it), ``layer_module`` and ``pool_cls``; it overrides ``layer_mask``, ``run_layer`` or
    ``pool`` where the family's layers or pooling need more than BERT's.
    """

    #: the ``attn_implementation`` values this family's adapter runs exactly as Hugging Face does.
    attention_implementations: tuple[str, ...] = ("eager", "sdpa")
    #: whether the family's forward takes ``token_type_ids``.
    uses_token_type_ids: bool = True
    #: whether ``run_layer(i, h, m)`` is ``layer_module(i)(h, m)`` (what the continuous engine compiles).
    layer_call_is_module_call: bool = True

    def __init__(self, model: nn.Module, heads: ExitHeads | None):
        config = model.config
        self.model = model
        self.heads = heads
        self.num_layers = config.num_hidden_layers
        self.num_labels = config.num_labels
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        # Layers refuse a length that is not a multiple of their feed-forward chunk: trimming rounds up to it.
        self.length_multiple = max(int(getattr(config, "chunk_size_feed_forward", 0) or 0), 1)

    _attn_override: str | None = None

    @property
    def attn_implementation(self) -> str:
        """Read on every use: ``model.set_attn_implementation`` may change it after patching."""
        return self._attn_override or self.model.config._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str | None) -> None:
        """Force the masks of another implementation (tests); None reads the config again."""
        self._attn_override = value

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (dropout on): the fused heads have no dropout."""
        return self.model.training

    def layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask ``run_layer`` takes, from the 2-D mask [n, S] (None: no padding).

        The engine calls it again whenever rows leave or padding is trimmed.
        """
        return layer_attention_mask(mask, self.attn_implementation, dtype)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
        return self.layer_module(index)(hidden, attention_mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own pooled vector of every row of ``hidden`` [n, S, H]: here the pooler on the [CLS] row."""
        return self.pool_cls(hidden[:, 0])

    @classmethod
    def default_pooling(cls, config) -> str:
        """The pooling of the internal exit heads when ``eek.patch`` is given none: the model's own."""
        return "cls"

    @property
    def head_pooling(self) -> str:
        """``"cls"`` or ``"mean"``: what the internal exit heads pool (see :class:`~earlyexit_kernels.engine.step.heads.ExitHeads`)."""
        return self.heads.pooling if self.heads is not None else self.default_pooling(self.model.config)

    @property
    def head_form(self) -> str:
        """``"model"``, ``"mlp"`` or ``"cascade"``: the form of the internal exit heads."""
        return self.heads.form if self.heads is not None else "model"

    @property
    def heads_read_below(self) -> bool:
        """Whether each internal head reads the logits of the head below (``"cascade"``): the
        engine runs every layer's head and carries its logits (state ``below_logits``)."""
        return self.heads is not None and self.heads.reads_below

    @property
    def fuses_internal_heads(self) -> bool:
        """Whether the internal heads have the form the fused kernels compute (a tanh-pooler family, ``"model"``)."""
        return hasattr(self, "head_weights") and self.head_form == "model"

    def token_vectors(self, hidden: torch.Tensor) -> torch.Tensor:
        """The token vectors the model's head pools, from a layer's output [..., H] (ModernBERT: its final norm; token-wise)."""
        return hidden

    def pooled_hidden(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[n, H]: the internal heads' pooling (``head_pooling``) of ``token_vectors(hidden)``.

        For ``"cls"`` a strided view of the [CLS] rows; what the fused kernels read."""
        if self.head_pooling == "mean":
            return masked_mean(self.token_vectors(hidden), mask)
        return self.token_vectors(hidden[:, 0])

    def pool_vector(self, pooled: torch.Tensor) -> torch.Tensor:
        """The model's own head before its last Linear, on a pooled token vector [n, H] -> [n, H]."""
        return self.pool_cls(pooled)

    def exit_input(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What the head of 1-based ``layer`` reads: ``hidden`` [n, S, H], 2-D ``mask`` [n, S] or None -> [n, H].

        Layer ``L``: the model's own ``pool``. Before it: ``pooled_hidden``, then for the ``"model"``
        form the model's pooler (``pool_vector``). No trainable head parameter is applied here
        (a cache of these vectors trains ``heads.classifiers[layer - 1]`` through :meth:`classify`);
        the halting heads read the same vector.
        """
        if layer == self.num_layers:
            return self.pool(hidden, mask)
        pooled = self.pooled_hidden(hidden, mask)
        return self.pool_vector(pooled) if self.head_form == "model" else pooled

    def fused_exit_head(self, layer: int) -> FusedExitHead | None:
        """The internal head of 1-based ``layer`` (< L) as the backends' fused per-layer step reads it
        (pooling, head and rule in one call), or None where it is not of that form: a family that
        transforms or pools its token vectors its own way (ModernBERT's final norm), a ``"model"``-form
        head without a tanh pooler, quantized or replaced modules."""
        family = type(self)
        if family.token_vectors is not EncoderAdapterBase.token_vectors:
            return None
        if family.pooled_hidden is not EncoderAdapterBase.pooled_hidden or self.heads is None:
            return None
        if not 1 <= layer < self.num_layers:
            return None
        if self.head_form == "mlp":
            head = self.heads.classifiers[layer - 1]
            if type(head) is not MLPExitHead or not all(map(_plain_linear, (head.dense, head.out))):
                return None
            norm = head.norm
            if type(norm) is not nn.LayerNorm or not plain_float(norm.weight) or not plain_float(norm.bias):
                return None
            return FusedExitHead(
                self.head_pooling,
                head.dense.weight,
                head.dense.bias,
                "gelu",
                head.out.weight,
                head.out.bias,
                norm.weight,
                norm.bias,
                float(norm.eps),
            )
        if not self.fuses_internal_heads:
            return None
        weights = self.head_weights(layer)
        if not all(map(plain_float, weights)):
            return None
        return FusedExitHead(self.head_pooling, weights[0], weights[1], "tanh", weights[2], weights[3])

    def classify(self, layer: int, pooled: torch.Tensor, below: torch.Tensor | None = None) -> torch.Tensor:
        """The head of 1-based ``layer`` on its ``exit_input`` [n, H] -> logits [n, C] (dropout in training).

        ``below`` [n, C]: the logits of the head of ``layer - 1``, which a ``"cascade"`` head of
        layers ``2..L-1`` reads; the other heads ignore it."""
        pooled = self.classifier_dropout(pooled)
        if layer == self.num_layers:
            return self.final_classifier(pooled)
        head = self.heads.classifiers[layer - 1]
        if below is not None and isinstance(head, CascadeExitHead):
            return head(pooled, below)
        return head(pooled)


class TanhPoolerHead:
    """Mixin of the families whose head is ``W_i tanh(W_p x + b_p) + b_i`` on [CLS]: fused on fast backends.

    The subclass sets ``pooler_linear`` (``W_p``, ``b_p``).
    """

    def head_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_p, b_p, W_i, b_i)`` of the ``"model"``-form head at 1-based ``layer``, for fused kernels
        (which read ``pooled_hidden``: the [CLS] row or the masked mean)."""
        head = self.final_classifier if layer == self.num_layers else self.heads.classifiers[layer - 1]
        return self.pooler_linear.weight, self.pooler_linear.bias, head.weight, head.bias
