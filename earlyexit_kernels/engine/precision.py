"""The base an early-exit model runs on: its device and its precision (float32, bfloat16, int8).

    model = to_base(model, dtype="int8", device="auto")   # a patched model, its exit heads fused on the base

``dtype``:

- ``"float32"`` and ``"bfloat16"``: the whole model cast (``model.to``); the fused exit step
  reads the heads in that dtype, as every backend does.
- ``"int8"``: the encoder's Linear layers dynamically quantized (``torch.ao.quantization.quantize_dynamic``,
  int8 weights, activations quantized per call; CPU only), with the recipe the family needs
  (:func:`int8_recipe`): MPNet keeps its feed-forward output projections float32, whose input
  (the GELU's output) carries the outliers a per-tensor activation scale loses (quantizing them
  costs MPNet-base 14 points on Rotten Tomatoes, keeping them float 1.9;
  ``benchmarks/int8_linear_sensitivity.py``); every other family quantizes every Linear of its
  encoder. The exit heads, the pooler and the classifier stay float32: the fused per-layer step
  reads them as they are (:mod:`earlyexit_kernels.engine.module_weights`).

``device``: ``"auto"`` (the GPU where torch sees one, else the CPU), ``"cpu"`` or ``"cuda"`` (a
clear error where torch has no CUDA device).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["DTYPES", "DEVICES", "INT8_RECIPES", "resolve_device", "int8_recipe", "int8_encoder", "to_base"]

#: the bases a model runs on (``--dtype``)
DTYPES = ("float32", "bfloat16", "int8")
#: where it runs (``--device``)
DEVICES = ("auto", "cpu", "cuda")
#: which of the encoder's Linear layers :func:`int8_encoder` quantizes
INT8_RECIPES = {
    "all": "every Linear layer of the encoder",
    "ffn-out-float": "every Linear layer of the encoder but the feed-forward output projections, kept float32",
}
#: the families whose int8 base keeps the feed-forward output projections float (``model_type``)
_FFN_OUT_FLOAT = frozenset({"mpnet"})


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``, a ``torch.device``) to the device to run on."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or name.split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N); got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if torch.version.cuda is None else f"sees no CUDA device (CUDA {torch.version.cuda})"
            raise ValueError(f"--device {name}: torch {torch.__version__} {build}; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def int8_recipe(model: nn.Module) -> str:
    """The :data:`INT8_RECIPES` key ``model``'s family needs (``"ffn-out-float"`` for MPNet, else ``"all"``)."""
    return "ffn-out-float" if getattr(model.config, "model_type", None) in _FFN_OUT_FLOAT else "all"


def _ffn_output(module: nn.Linear, config) -> bool:
    """The feed-forward output projection of any family: intermediate_size in, hidden_size out."""
    return (module.in_features, module.out_features) == (config.intermediate_size, config.hidden_size)


def int8_encoder(model: nn.Module, recipe: str = "auto", *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its encoder's Linear layers dynamically quantized to int8.

    ``recipe``: ``"auto"`` (:func:`int8_recipe`) or a key of :data:`INT8_RECIPES`."""
    recipe = int8_recipe(model) if recipe == "auto" else recipe
    if recipe not in INT8_RECIPES:
        raise ValueError(f"int8 recipe must be auto or one of {', '.join(INT8_RECIPES)}; got {recipe!r}")
    quantized = model if inplace else copy.deepcopy(model)
    # the encoder's Linear layers, whatever the family calls its encoder; the pooler (read by the fused
    # head) stays float, as do the exit heads and the classifier, which live outside the base model
    spec = {
        name: torch.ao.quantization.default_dynamic_qconfig
        for name, module in quantized.base_model.named_modules()
        if isinstance(module, nn.Linear)
        and not name.startswith("pooler")
        and not (recipe == "ffn-out-float" and _ffn_output(module, quantized.config))
    }
    if not spec:
        raise ValueError(f"int8: {type(model).__name__} has no Linear layer in its encoder to quantize")
    with warnings.catch_warnings():
        # PyTorch's deprecation notices of torch.ao.quantization and quantize_per_tensor: ours to act on
        # (issue 64 chooses the int8 recipe), not something a user of eek can do anything about
        warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        torch.ao.quantization.quantize_dynamic(quantized.base_model, spec, dtype=torch.qint8, inplace=True)
    return quantized


def to_base(model: nn.Module, dtype: str | None = None, device: str | torch.device = "auto") -> nn.Module:
    """``model`` on ``device`` at ``dtype`` (None: as saved), in place where it can be (int8 swaps the
    encoder's Linear modules for quantized ones in place too). Returns the model."""
    target = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "int8":
        if target.type != "cpu":
            raise ValueError(
                f"dtype int8 runs on the CPU only (dynamic quantization); use --device cpu, or --dtype bfloat16 on "
                f"{target}"
            )
        model.float()
        return int8_encoder(model, inplace=True).to(target)
    if dtype == "bfloat16":
        return model.to(device=target, dtype=torch.bfloat16)
    if dtype == "float32":
        return model.to(device=target, dtype=torch.float32)
    return model.to(target)
