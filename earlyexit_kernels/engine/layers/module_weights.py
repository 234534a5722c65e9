"""Reading the weights of a Linear that may be quantized.

A user may quantize a model before or after ``eek.patch``: ``torch.ao.quantization.quantize_dynamic``
replaces each ``nn.Linear`` by a dynamically quantized module whose ``weight`` and ``bias`` are
methods returning a quantized (``qint8``) tensor, and torchao's ``quantize_`` keeps the
``nn.Linear`` but makes its weight a tensor subclass. Neither is a float weight a fused kernel
can read. These helpers say what a Linear is (:func:`plain_float`, :func:`fusable_head_weights`),
where and in which dtype it computes (:func:`linear_device`, :func:`linear_compute_dtype`),
and give its weight as a float tensor (:func:`float_weight`, for initialising a copy).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "float_bias",
    "float_weight",
    "fusable_head_weights",
    "linear_compute_dtype",
    "linear_device",
    "plain_float",
]

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def plain_float(value) -> bool:
    """Whether ``value`` is a plain floating-point tensor (not quantized, not a tensor subclass, not a method)."""
    return type(value) in _PLAIN_TENSOR_TYPES and value.dtype.is_floating_point and not value.is_quantized


def fusable_head_weights(adapter) -> bool:
    """Whether every internal head's ``(W_p, b_p, W_i, b_i)`` (layers ``1..L-1``) is a plain float tensor.

    The fused kernels read those tensors; a head with a quantized Linear (``quantize_dynamic``,
    torchao) runs as modules instead: the adapter's pooling and classifier, then the backend's
    ``exit_step``.
    """
    if not hasattr(adapter, "head_weights"):
        return False
    return all(plain_float(t) for layer in range(1, adapter.num_layers) for t in adapter.head_weights(layer))


def _raw_weight(module: nn.Module):
    weight = module.weight
    # torch.ao's quantized Linear modules expose weight() and bias() as methods
    return weight() if callable(weight) and not isinstance(weight, torch.Tensor) else weight


def _raw_bias(module: nn.Module):
    bias = module.bias
    return bias() if callable(bias) and not isinstance(bias, torch.Tensor) else bias


def linear_device(module: nn.Module) -> torch.device:
    """The device of a Linear's weight, float or quantized."""
    return _raw_weight(module).device


def linear_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a Linear takes and returns: its weight's, or float32 for torch.ao's quantized modules.

    torchao's quantized weights report the dtype they were quantized from, which is the dtype
    of their activations.
    """
    weight = _raw_weight(module)
    if weight.is_quantized or weight.dtype in (torch.qint8, torch.quint8, torch.qint32):
        return torch.float32
    return weight.dtype


def _dequantized(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_quantized or not plain_float(tensor):
        tensor = tensor.dequantize()
    return tensor.detach()


def float_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's weight [out, in] as a plain float tensor (dequantized where it is quantized)."""
    return _dequantized(_raw_weight(module))


def float_bias(module: nn.Module) -> torch.Tensor | None:
    """A Linear's bias [out] as a plain float tensor, or None."""
    bias = _raw_bias(module)
    return None if bias is None else _dequantized(bias)


def module_paths(owner, model: nn.Module) -> dict[str, str]:
    """``{attribute: qualified name in model}`` of the attributes of ``owner`` that are submodules of ``model``.

    What :func:`replaced_modules` checks later: an adapter holds modules of the model (its
    classifier, its pooler's Linear), and ``quantize_dynamic`` after ``eek.patch`` swaps them
    for quantized ones in the model, not in the adapter.
    """
    names = {id(module): name for name, module in model.named_modules() if name}
    return {attr: names[id(value)] for attr, value in vars(owner).items() if id(value) in names}


def replaced_modules(owner, model: nn.Module, paths: dict[str, str]) -> bool:
    """Whether a module ``owner`` holds (``paths`` from :func:`module_paths`) is no longer the model's."""
    for attr, name in paths.items():
        try:
            if model.get_submodule(name) is not getattr(owner, attr):
                return True
        except AttributeError:
            return True
    return False
