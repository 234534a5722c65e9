"""A BERT-style encoder layer run op by op, without its modules' Python; on every position or packed.

A BERT-style layer (BERT, RoBERTa, XLM-R, ELECTRA: ``attention.self`` with ``query``/``key``/
``value``, ``attention.output``, ``intermediate``, ``output``) is token-wise everywhere but in
the attention's score-and-mix. :func:`run_packed` runs the projections, the feed-forward and the
norms on the ``T`` valid tokens [T, H] instead of the ``n x S`` padded positions, and scatters
only the query/key/value projections onto the padded grid for the attention, which runs through
the model's own attention function (``config._attn_implementation``) with the layer's mask.
Where a call pads much (a batch with one long row), the token-wise work shrinks by the padding.
Without ``positions`` it runs every position, the layer's own operations in its own shapes.

Either way the linear layers and norms are called as functions on the modules' weights where
the modules are the stock ones (``nn.Linear``, ``nn.LayerNorm``, and a self-output, intermediate
and output whose ``forward`` is BERT's): a layer call through its modules costs about 20 module
calls and transformers' bookkeeping, 0.1-0.2 ms on a CPU, which at hidden 128 is 5-15% of the
call. Other modules (quantized linears, custom blocks) are called as they are.

On the CPU, a stock layer with SDPA attention and exact GELU, run on every position with no graph
recorded and autocast off, is one C++ operator (``torch.ops.earlyexit.cpp_bert_layer``,
``csrc/cpu/bert_layer_cpu.cpp``): the same ATen calls in the same order, without Python between
them (which, after a layer's products have left the caches cold, costs more than it does warm).

Packed, the result is the layer's up to the rounding of matrix products over a different row
count, and positions that are padding hold zeros; on every position it is the layer's, bit for bit.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OpByOpLayer", "has_forward_hooks", "run_packed", "splits_into_token_parts"]


def splits_into_token_parts(layer: nn.Module) -> bool:
    """Whether ``layer`` has the BERT-style structure :func:`run_packed` runs (and no cross-attention,
    no relative positions)."""
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (
        self_attention is not None
        and all(isinstance(getattr(self_attention, name, None), nn.Module) for name in ("query", "key", "value"))
        and hasattr(self_attention, "attention_head_size")
        and hasattr(self_attention, "scaling")
        and isinstance(getattr(attention, "output", None), nn.Module)
        and isinstance(getattr(layer, "intermediate", None), nn.Module)
        and isinstance(getattr(layer, "output", None), nn.Module)
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "chunk_size_feed_forward", 0)
        and not getattr(self_attention, "is_causal", False)
        # older transformers: relative position scores inside the attention, or no attention interface
        and not hasattr(self_attention, "distance_embedding")
        and getattr(getattr(self_attention, "config", None), "position_embedding_type", "absolute") == "absolute"
        and hasattr(sys.modules.get(type(self_attention).__module__), "eager_attention_forward")
    )


def has_forward_hooks(layer: nn.Module) -> bool:
    """Whether calling ``layer`` runs forward hooks (its own or global ones) that would do something:
    a packed call would skip them. transformers' own output-capturing hook (installed on every layer
    at a model's first forward) does nothing outside a forward that collects hidden states."""
    from torch.nn.modules import module as torch_module

    hooks = [
        *layer._forward_hooks.values(),
        *layer._forward_pre_hooks.values(),
        *torch_module._global_forward_hooks.values(),
        *torch_module._global_forward_pre_hooks.values(),
    ]
    return any(not _idle_output_capture(hook) for hook in hooks)


def _idle_output_capture(hook) -> bool:
    """Whether ``hook`` is transformers' output-capturing hook with no collection under way."""
    collector = _CAPTURE_COLLECTORS.get(hook, _UNSEEN)
    if collector is _UNSEEN:  # what a hook is does not change: looked up once per hook
        module = sys.modules.get(getattr(hook, "__module__", None) or "")
        is_capture = getattr(hook, "__name__", None) == "output_capturing_hook" and module is not None
        collector = _CAPTURE_COLLECTORS[hook] = getattr(module, "_active_collector", None) if is_capture else None
    return collector is not None and not collector.get()  # None, or {}: nothing to collect


_UNSEEN = object()
# hook -> transformers' collection context variable where the hook is its output-capturing hook, else None
_CAPTURE_COLLECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attention_function(self_attention: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(self_attention).__module__].eager_attention_forward
    implementation = self_attention.config._attn_implementation
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _same_code(function, reference) -> bool:
    code, expected = getattr(function, "__code__", None), reference.__code__
    return code is not None and (code.co_code, code.co_names, code.co_consts) == (
        expected.co_code,
        expected.co_names,
        expected.co_consts,
    )


_STOCK: dict[type, bool] = {}


def _stock(module: nn.Module) -> bool:
    """Whether ``module`` is a BERT self-output / output (dense, dropout, LayerNorm of the sum) or
    intermediate (dense, activation) with stock parts: then :class:`OpByOpLayer` may run it as
    functions. Decided once per class, then per module's parts."""
    kind = type(module)
    if kind not in _STOCK:
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        _STOCK[kind] = _same_code(kind.forward, BertOutput.forward) or _same_code(
            kind.forward, BertIntermediate.forward
        )
    if not _STOCK[kind] or module.training or type(getattr(module, "dense", None)) is not nn.Linear:
        return False
    norm = getattr(module, "LayerNorm", None)
    return norm is None or type(norm) is nn.LayerNorm


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Linear:
        parameters = module._parameters  # read at every call, without nn.Module.__getattr__
        return F.linear(x, parameters["weight"], parameters["bias"])
    return module(x)


def _activation(module: nn.Module):
    """The function a stock intermediate block's activation module computes: ``F.gelu`` for
    transformers' ``GELUActivation`` on it (no hooks), the module itself otherwise."""
    from transformers.activations import GELUActivation

    plain = (
        _same_code(type(module).forward, GELUActivation.forward)
        and getattr(module, "act", None) is F.gelu
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )
    return F.gelu if plain else module


def _native_layer_op():
    """``torch.ops.earlyexit.cpp_bert_layer`` where the C++ extension is loaded with it, else None."""
    from earlyexit_kernels.backends import cpp_backend

    if cpp_backend.LOAD_ERROR is not None:
        return None
    return torch.ops.earlyexit.cpp_bert_layer.default


def _is_sdpa_attention(function) -> bool:
    return (
        getattr(function, "__name__", None) == "sdpa_attention_forward"
        and getattr(function, "__module__", None) == "transformers.integrations.sdpa_attention"
    )


class OpByOpLayer:
    """One BERT-style layer, its structure read once: which blocks are stock, its attention function.

    Call it as :func:`run_packed` (which builds one per call); the continuous engine keeps one per
    layer. Weights are read from the modules at every call.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self_attention = layer.attention.self
        self.self_attention = self_attention
        self.projections = (self_attention.query, self_attention.key, self_attention.value)
        self.head_size = self_attention.attention_head_size
        self.scaling = self_attention.scaling
        self.attention = _attention_function(self_attention)
        self.attention_output, self.intermediate, self.output = layer.attention.output, layer.intermediate, layer.output
        self.stock_attention_output = _stock(self.attention_output) and hasattr(self.attention_output, "LayerNorm")
        self.stock_output = _stock(self.output) and hasattr(self.output, "LayerNorm")
        self.stock_intermediate = _stock(self.intermediate) and not hasattr(self.intermediate, "LayerNorm")
        if self.stock_intermediate:
            self.activation = _activation(self.intermediate.intermediate_act_fn)
        self.native, self.native_parameters = self._native_form()

    def _native_form(self):
        """The C++ layer and where its 16 weights are read (module, name), where it computes this layer:
        stock blocks of linear layers with biases and affine LayerNorms, exact GELU, SDPA attention
        without grouped heads; else (None, ())."""
        if not (self.stock_attention_output and self.stock_output and self.stock_intermediate):
            return None, ()
        norms = (self.attention_output.LayerNorm, self.output.LayerNorm)
        linears = (*self.projections, self.attention_output.dense, self.intermediate.dense, self.output.dense)
        eligible = (
            self.activation is F.gelu
            and _is_sdpa_attention(self.attention)
            and getattr(self.self_attention, "num_key_value_groups", 1) == 1
            and all(type(linear) is nn.Linear and linear.bias is not None for linear in linears)
            and all(
                norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1 for norm in norms
            )
        )
        op = _native_layer_op() if eligible else None
        if op is None:
            return None, ()
        parameters = []
        for module in (*linears[:4], norms[0], *linears[4:], norms[1]):
            parameters += [(module, "weight"), (module, "bias")]
        return op, tuple(parameters)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor | None, layer_mask) -> torch.Tensor:
        n, length, width = hidden.shape
        head_size = self.head_size
        # In place where nothing records a graph and autocast does not change dtypes between the ops.
        inplace = not torch.is_grad_enabled() and not torch.is_autocast_enabled(hidden.device.type)
        if positions is None and inplace and self.native is not None and hidden.device.type == "cpu":
            # The same operations in C++, without Python between them.
            return self.native(
                hidden,
                layer_mask,
                [module._parameters[name] for module, name in self.native_parameters],
                self.attention_output.LayerNorm.eps,
                self.output.LayerNorm.eps,
                head_size,
                self.scaling,
            )
        if positions is None:  # the layer's own operations, in its own shapes
            tokens = hidden
            query, key, value = (
                _linear(projection, hidden).view(n, length, -1, head_size).transpose(1, 2)
                for projection in self.projections
            )
        else:
            tokens = hidden.reshape(n * length, width).index_select(0, positions)  # [T, H]
            projected = torch.cat([_linear(projection, tokens) for projection in self.projections], dim=1)
            grid = projected.new_zeros(n * length, projected.shape[1]).index_copy_(0, positions, projected)
            query, key, value = (
                part.view(n, length, -1, head_size).transpose(1, 2) for part in grid.view(n, length, 3, -1).unbind(2)
            )
        mixed, _ = self.attention(
            self.self_attention, query, key, value, layer_mask, dropout=0.0, scaling=self.scaling
        )  # [n, S, heads, head_size]
        if positions is None:
            mixed = mixed.reshape(n, length, -1).contiguous()
        else:
            mixed = mixed.reshape(n * length, -1).index_select(0, positions)
        out = self._after_attention(mixed, tokens, inplace)
        if positions is None:
            return out
        return out.new_zeros(n * length, width).index_copy_(0, positions, out).view(n, length, width)

    def on_tokens(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        """The layer on packed tokens [T, H] (sequences one after another, no padding): the projections,
        the feed-forward and the norms on the T tokens, the attention by ``attend(q, k, v, scaling)``
        ([T, heads, head_size] each, a varlen attention: :mod:`earlyexit_kernels.engine.layers.varlen_attention`)."""
        inplace = not torch.is_grad_enabled() and not torch.is_autocast_enabled(tokens.device.type)
        count = tokens.shape[0]
        query, key, value = (
            _linear(projection, tokens).view(count, -1, self.head_size) for projection in self.projections
        )
        mixed = attend(query, key, value, self.scaling).reshape(count, -1)
        return self._after_attention(mixed, tokens, inplace)

    def _after_attention(self, mixed: torch.Tensor, tokens: torch.Tensor, inplace: bool) -> torch.Tensor:
        """The attention's output block, the feed-forward and the output block, token by token."""
        attended = self._add_norm(self.attention_output, self.stock_attention_output, mixed, tokens, inplace)
        if self.stock_intermediate:
            inner = _linear(self.intermediate.dense, attended)
            # In place: the same kernel, one activation-sized tensor less.
            inner = torch._C._nn.gelu_(inner) if self.activation is F.gelu and inplace else self.activation(inner)
        else:
            inner = self.intermediate(attended)
        return self._add_norm(self.output, self.stock_output, inner, attended, inplace)

    @staticmethod
    def _add_norm(
        block: nn.Module, stock: bool, x: torch.Tensor, residual: torch.Tensor, inplace: bool
    ) -> torch.Tensor:
        """``block(x, residual)`` of a self-output / output block: LayerNorm(dense(x) + residual) in eval."""
        if not stock:
            return block(x, residual)
        norm = block.LayerNorm
        parameters = norm._parameters
        summed = _linear(block.dense, x)  # a stock dense is an nn.Linear: a new tensor, added to in place
        summed = summed.add_(residual) if inplace else summed + residual
        return F.layer_norm(summed, norm.normalized_shape, parameters["weight"], parameters["bias"], norm.eps)


def run_packed(layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor | None, layer_mask) -> torch.Tensor:
    """``layer`` on ``hidden`` [n, S, H], computed at the flat ``positions`` [T] (of ``n * S``) only, or
    at every position where ``positions`` is None.

    ``layer_mask``: the mask the layer takes (see ``EncoderAdapterBase.layer_mask``), which must
    mask every position outside ``positions``. Returns [n, S, H]; packed, zeros outside ``positions``.
    """
    return OpByOpLayer(layer)(hidden, positions, layer_mask)
