"""Where a served float32 model's encoder layers run: PyTorch's modules, or one ONNX Runtime graph each.

    line = serve_layers(model, "auto")   # in place; line: what runs, for the server's start-up log and /info

Why (docs/serving.md, "What a server keeps"): on the CPU a float32 layer call's activations (blocks of
128 KiB to a few MiB, of a new size at nearly every call) spread glibc's heap, and a served MiniLM-L6
grew its resident memory by about a tenth over a 300 s soak (25% at its widest) whatever the periodic
trim returned, while the bytes it held stayed flat. The same layer as an ONNX Runtime float32 graph
(:class:`~earlyexit_kernels.engine.layers.ort_layer.OrtLayer`, ``int8=False``: equal to the layer up to float
rounding) takes its activations from ONNX Runtime's one arena, which the calls reuse, so the memory
is bounded by the largest call served. One layer alone runs about twice as fast on one thread
(``benchmarks/results/amd_epyc/ort_layer_cpu.md``); served at concurrency 32 it was ahead in each of
3 rounds, but ``eek.classify`` in batches of 32 took 10.3 s against 8.7 s on MiniLM-L6 (docs/serving.md).

``layers``:

- ``"auto"`` (``eek serve``'s default): ONNX Runtime where it can run them: the model float32 on the
  CPU, ``onnxruntime`` and ``onnx`` installed, every encoder layer one the graph runs (BERT-style and
  MPNet layers with the erf GELU), no ``torch.compile``; else PyTorch's, the line saying why;
- ``"onnxruntime"``: ONNX Runtime, or a ``ValueError`` saying why it cannot;
- ``"openvino"``: the same float32 graphs read by OpenVINO
  (:class:`~earlyexit_kernels.engine.layers.ov_layer.OvLayer`, ``int8=False``), or a ``ValueError`` saying why
  it cannot. One MiniLM-L6 layer on 32 rows of about 40 tokens took 48.6 ms there against 58.5 on ONNX
  Runtime and 71.1 in PyTorch (one thread, alone, Intel Xeon; ``benchmarks/micro/ov_layer.py``,
  ``benchmarks/results/intel_xeon/ov_layer_cpu.md``); its memory
  under traffic was not measured, so ``auto`` stays ONNX Runtime;
- ``"torch"``: PyTorch's modules, as ``eek.classify`` and ``eek fit`` run them.

An int8 model is left as its recipe made it (``per-token-ort`` runs on ONNX Runtime already,
``per-token-ov`` on OpenVINO); bfloat16 and GPU models run PyTorch's.

A runtime layer makes its session (OpenVINO: its compiled model) at its first call: MPNet-base int8's 12 took
0.64-0.77 s on the AMD EPYC. A server calls :func:`prepare_layers` before it takes requests, or the first
requests to reach each layer pay for it: to a just-started ``eek serve --dtype int8`` of MPNet-base, the first
request took 128 ms and the slowest of the first 8 682 ms, against 19 and 90 ms prepared (medians of 3 rounds;
docs/serving.md, "The first request").
"""

from __future__ import annotations

import torch
from torch import nn

from earlyexit_kernels.engine.layers import ov_layer  # imports no OpenVINO: it reads it where a layer is compiled
from earlyexit_kernels.engine.layers.ort_layer import (
    ORT_MISSING,
    OrtLayer,
    PackedGraphLayer,
    encoder_layers,
    layer_parts,
    ort_available,
    run_on_ort,
)

__all__ = ["SERVED_LAYERS", "serve_layers", "layers_of", "prepare_layers"]

#: where a served float32 model's encoder layers run (``eek serve --layers``)
SERVED_LAYERS = ("auto", "onnxruntime", "openvino", "torch")
#: the runtimes' names, as the start-up line says them
_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "torch": "PyTorch's kernels"}


def _layer_class(runtime: str) -> type:
    return ov_layer.OvLayer if runtime == "openvino" else OrtLayer


def _missing(runtime: str) -> str | None:
    """What is not installed for ``runtime``'s layers, or None."""
    if runtime == "openvino":
        return None if ov_layer.ov_available() else ov_layer.OV_MISSING
    return None if ort_available() else ORT_MISSING


def _why_not(model: nn.Module, compiled: bool, runtime: str = "onnxruntime") -> str | None:
    """Why the float32 layers of ``model`` cannot run on ``runtime`` (``onnxruntime`` or ``openvino``); None when
    they can."""
    parameters = list(model.parameters())
    if any(p.device.type != "cpu" for p in parameters):
        return "the model is on a GPU"
    if any(p.dtype.is_floating_point and p.dtype != torch.float32 for p in parameters):
        return "the model is not float32"
    if compiled:
        return "--compile compiles PyTorch's layers"
    missing = _missing(runtime)
    if missing is not None:
        return missing
    layers = encoder_layers(model)
    if layers is None:
        return f"{type(model).__name__} has no encoder.layer list"
    for layer in layers:
        if isinstance(layer, _layer_class(runtime)):
            continue
        try:
            layer_parts(layer, model.config)
        except ValueError as error:
            return str(error)
    return None


def serve_layers(model: nn.Module, layers: str = "auto", *, compiled: bool = False) -> str:
    """Run ``model``'s encoder layers where ``layers`` says (the module docstring), in place; returns the
    line that says what runs. ``compiled``: the layer calls go through ``torch.compile``."""
    if layers not in SERVED_LAYERS:
        raise ValueError(f"layers must be one of {', '.join(SERVED_LAYERS)}; got {layers!r}")
    recipe = getattr(model, "eek_int8_recipe", None)
    if recipe is not None:  # the int8 base: its recipe decides
        where = layers_of(model)
        if layers in ("onnxruntime", "openvino") and where != layers:
            raise ValueError(
                f"--layers {layers}: the int8 recipe {recipe} runs on {_NAMES[where]}, as its certificate was made"
            )
        return f"layers: int8 on {_NAMES[where]} (the recipe {recipe})"
    if layers == "torch":
        return "layers: PyTorch's modules (--layers torch)"
    runtime = "openvino" if layers == "openvino" else "onnxruntime"
    reason = _why_not(model, compiled, runtime)
    if reason is not None:
        if layers != "auto":
            raise ValueError(f"--layers {layers}: {reason}; serve with --layers torch")
        return f"layers: PyTorch's modules ({reason})"
    if runtime == "openvino":
        ov_layer.run_on_ov(model, int8=False)
        return "layers: float32 on OpenVINO, one model a layer (--layers torch: PyTorch's modules)"
    run_on_ort(model, int8=False)
    return "layers: float32 on ONNX Runtime, one graph a layer (--layers torch: PyTorch's modules)"


def layers_of(model: nn.Module) -> str:
    """Where ``model``'s encoder layers run now: ``"onnxruntime"`` (every one an :class:`OrtLayer`), ``"openvino"``
    (every one an ``OvLayer``) or ``"torch"``."""
    layers = encoder_layers(model)
    if layers is None or not len(layers):
        return "torch"
    for runtime in ("onnxruntime", "openvino"):
        if all(isinstance(layer, _layer_class(runtime)) for layer in layers):
            return runtime
    return "torch"


def prepare_layers(model: nn.Module) -> int:
    """Make every runtime layer of ``model`` make its session or compiled model now (:meth:`PackedGraphLayer.prepare
    <earlyexit_kernels.engine.layers.ort_layer.PackedGraphLayer.prepare>`), for torch's thread count now; returns how
    many it prepared (0 where the layers are PyTorch's)."""
    layers = encoder_layers(model)
    prepared = 0
    for layer in layers if layers is not None else ():
        if isinstance(layer, PackedGraphLayer):
            layer.prepare()
            prepared += 1
    return prepared
