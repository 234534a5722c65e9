"""The base an early-exit model runs on: its device and its precision (float32, bfloat16, int8).

    model = to_base(model, dtype="int8", device="auto")   # a patched model, its exit heads fused on the base

``dtype``:

- ``"float32"`` and ``"bfloat16"``: the whole model cast (``model.to``); the fused exit step
  reads the heads in that dtype, as every backend does.
- ``"int8"``: the encoder's Linear layers int8 (CPU only) with the recipe measured for the family
  (:data:`FAMILY_INT8_RECIPES`, :func:`int8_recipe`): BERT (MiniLM) and MPNet run one activation
  scale per token and one weight scale per output channel, each encoder layer one ONNX Runtime graph
  (``"per-token-ort"``, :class:`~earlyexit_kernels.engine.layers.ort_layer.OrtLayer`) where onnxruntime is
  installed, else the same quantization on PyTorch's kernels (``"per-token"``,
  :class:`~earlyexit_kernels.engine.layers.int8_linear.PerTokenInt8Linear`): the same agreement with float32
  (MiniLM-L6 99.5% both, MPNet-base 99.7% against 99.8%), 1.72x the speed on MiniLM-L6 at full depth
  and 1.42x on MPNet-base (``benchmarks/results/amd_epyc/int8_recipes_cpu.md``). ``quantize_dynamic``'s one
  scale per call loses the tokens beside an outlier: the GELU's outliers that MPNet's feed-forward
  output projections read cost MPNet 14 points (``benchmarks/int8_linear_sensitivity.py``), which is
  why its recipe used to keep them float32. Measured on Rotten Tomatoes' first 1,000 test texts at
  full depth (``benchmarks/micro/int8_recipes.py``; docs/serving.md, "The int8 base"), agreement with
  the float32 model: MiniLM-L6 99.5% per-token, 95.2% ``quantize_dynamic`` of every Linear (its
  recipe before), 98.3% with the feed-forward outputs float; MPNet-base 97.9% per-token, 93.6% with the
  feed-forward outputs float (its recipe before), 74.2% ``quantize_dynamic`` of every Linear (all-mpnet-base-v2
  with its classification head fitted on 1,024 train texts over the frozen encoder: the fine-tuned
  MPNet was not at hand). A family
  whose int8 base was not measured is refused with what runs instead (``--dtype bfloat16`` or
  ``float32``; :func:`int8_encoder` takes a recipe by hand). The recipe a folder's int8 certificate
  was made with is recorded beside it (``eek calibrate --dtype int8``;
  :func:`earlyexit_kernels.integrations.model_folder.int8_recipe_of`) and is the one it runs. The exit
  heads, the pooler and the classifier stay float32: the fused per-layer step reads them as they are
  (:mod:`earlyexit_kernels.engine.layers.module_weights`).

``device``: ``"auto"`` (the GPU where torch sees one, else the CPU), ``"cpu"`` or ``"cuda"`` (a
clear error where torch has no CUDA device).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_linear import PerTokenInt8Linear
from earlyexit_kernels.engine.layers.ort_layer import ORT_MISSING, encoder_layers, ort_available, run_on_ort

__all__ = [
    "DTYPES",
    "DEVICES",
    "INT8_RECIPES",
    "INT8_LAYERS",
    "CALIBRATED_RECIPES",
    "FAMILY_INT8_RECIPES",
    "resolve_device",
    "int8_recipe",
    "int8_recipe_on",
    "runnable_int8_recipe",
    "legacy_int8_recipe",
    "int8_encoder",
    "to_base",
]

#: the bases a model runs on (``--dtype``)
DTYPES = ("float32", "bfloat16", "int8")
#: where it runs (``--device``)
DEVICES = ("auto", "cpu", "cuda")
#: how :func:`int8_encoder` quantizes the encoder's Linear layers
INT8_RECIPES = {
    "all": "every Linear layer of the encoder dynamic int8 (quantize_dynamic: one activation scale per call)",
    "ffn-out-float": "every Linear layer of the encoder dynamic int8 but the feed-forward output projections, kept "
    "float32",
    "per-token": "every Linear layer of the encoder int8 with one activation scale per token and one weight scale "
    "per output channel (PerTokenInt8Linear)",
    "ffn-out-per-token": "every Linear layer of the encoder dynamic int8 but the feed-forward output projections, "
    "int8 with one activation scale per token and one weight scale per output channel",
    "per-token-ort": "every Linear layer of the encoder int8 per token x per channel, as per-token, each encoder layer "
    "run by ONNX Runtime (one graph per layer, OrtLayer)",
    "per-token-ov": "every Linear layer of the encoder int8 per token x per channel, as per-token, each encoder layer "
    "run by OpenVINO (OvLayer; where openvino is installed)",
    "static-ov": "every Linear layer of the encoder static int8 (NNCF's quantize with the transformer preset: one "
    "scale per activation tensor, set on calibration rows, one per output channel for the weights), each encoder "
    "layer run by OpenVINO (ov_static; where openvino and nncf are installed; made by eek fit --dtype int8 on "
    "training rows and saved in the folder)",
}
#: the recipe of each family (``model_type``) whose int8 base was measured against its float32 model
#: (agreement and speed at full depth, ``benchmarks/micro/int8_recipes.py``; docs/serving.md, "The int8 base")
FAMILY_INT8_RECIPES = {"bert": "per-token-ort", "mpnet": "per-token-ort"}
#: where the int8 layers run (``eek calibrate --dtype int8 --layers``) and the per-token recipe that runs them there
#: (``auto``: the family's, :func:`int8_recipe`); the same quantization, on each runtime's kernels
INT8_LAYERS = {
    "onnxruntime": "per-token-ort",
    "openvino": "per-token-ov",
    "torch": "per-token",
    "openvino-static": "static-ov",
}
#: the recipes whose layers are calibrated on rows (:func:`int8_encoder`'s ``calibration``), not made from the
#: weights alone
CALIBRATED_RECIPES = frozenset({"static-ov"})
#: where a recipe's runtime is not installed, the recipe that runs in its place, on the next runtime (the same
#: quantization: OpenVINO's layers on ONNX Runtime's, ONNX Runtime's on PyTorch's kernels)
NEXT_RUNTIME = {"static-ov": "per-token-ort", "per-token-ov": "per-token-ort", "per-token-ort": "per-token"}
#: the recipe every family's int8 base had before recipes were chosen per family and recorded in the folder
#: (a folder certified on int8 then holds no record: :func:`legacy_int8_recipe`)
_LEGACY_FFN_OUT_FLOAT = frozenset({"mpnet"})


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
    """The :data:`INT8_RECIPES` key ``model``'s family takes (:data:`FAMILY_INT8_RECIPES`); a ``ValueError``
    saying what runs instead for a family whose int8 base was never measured."""
    family = getattr(model.config, "model_type", None)
    if family not in FAMILY_INT8_RECIPES:
        raise ValueError(
            f"int8 has no recipe for the {family} family: its int8 base was not measured against its float32 model "
            f"(measured: {', '.join(sorted(FAMILY_INT8_RECIPES))}). Run --dtype bfloat16 or float32 instead, or "
            "choose a recipe yourself (earlyexit_kernels.engine.layers.precision.int8_encoder(model, recipe), one of "
            f"{', '.join(INT8_RECIPES)})"
        )
    return runnable_int8_recipe(FAMILY_INT8_RECIPES[family])[0]


def runnable_int8_recipe(recipe: str) -> tuple[str, str | None]:
    """``(recipe, None)`` where ``recipe``'s runtime is installed; else the recipe of the next runtime that is
    (:data:`NEXT_RUNTIME`) and why ``recipe`` does not run (the missing runtime and what installs it)."""
    why = None
    while (missing := _missing_runtime(recipe)) is not None:
        why = why or f"{recipe}: {missing}"
        recipe = NEXT_RUNTIME[recipe]
    return recipe, why


def _missing_runtime(recipe: str) -> str | None:
    """Which packages ``recipe``'s runtime needs and this environment lacks (what installs them), or None."""
    from earlyexit_kernels.engine.layers import ov_layer

    if recipe == "static-ov":
        from earlyexit_kernels.engine.layers import ov_static

        return None if ov_static.static_available() else ov_static.STATIC_MISSING
    if recipe == "per-token-ov":
        return None if ov_layer.ov_available() else ov_layer.OV_MISSING
    if recipe == "per-token-ort":
        return None if ort_available() else ORT_MISSING
    return None


def int8_recipe_on(model: nn.Module, layers: str = "auto") -> str:
    """The int8 recipe of ``model`` with its int8 layers on ``layers`` (``auto``, or a key of :data:`INT8_LAYERS`):
    the family's where ``auto``; a ``ValueError`` for a family never measured (:func:`int8_recipe`) or another
    choice."""
    recipe = int8_recipe(model)  # the family was measured on int8, or this says what runs instead
    if layers == "auto":
        return recipe
    if layers not in INT8_LAYERS:
        raise ValueError(f"the int8 layers run on auto or one of {', '.join(INT8_LAYERS)}; got {layers!r}")
    return INT8_LAYERS[layers]


def legacy_int8_recipe(model: nn.Module) -> str:
    """The recipe ``--dtype int8`` ran before recipes were recorded: ``ffn-out-float`` for MPNet, else ``all``."""
    return "ffn-out-float" if getattr(model.config, "model_type", None) in _LEGACY_FFN_OUT_FLOAT else "all"


_int8_recipe_of = int8_recipe  # to_base's parameter shadows the function's name


def _ffn_output(module: nn.Linear, config) -> bool:
    """The feed-forward output projection of any family: intermediate_size in, hidden_size out."""
    return (module.in_features, module.out_features) == (config.intermediate_size, config.hidden_size)


def _encoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    # the encoder's Linear layers, whatever the family calls its encoder; the pooler (read by the fused
    # head) stays float, as do the exit heads and the classifier, which live outside the base model
    return [
        (name, module)
        for name, module in model.base_model.named_modules()
        if isinstance(module, nn.Linear) and not name.startswith("pooler")
    ]


def int8_encoder(
    model: nn.Module,
    recipe: str = "auto",
    *,
    inplace: bool = False,
    calibration: list[dict] | None = None,
    saved=None,
) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its encoder's Linear layers int8, as ``recipe`` says.

    ``recipe``: ``"auto"`` (:func:`int8_recipe`, the family's) or a key of :data:`INT8_RECIPES`. The
    model records it as ``model.eek_int8_recipe``. A recipe of :data:`CALIBRATED_RECIPES` runs the layers a model
    folder ``saved`` (:func:`~earlyexit_kernels.engine.layers.ov_static.save_static_layers`), else sets its scales on
    ``calibration`` (batches of the model's inputs; rows that never certify)."""
    recipe = int8_recipe(model) if recipe == "auto" else recipe
    if recipe not in INT8_RECIPES:
        raise ValueError(f"int8 recipe must be auto or one of {', '.join(INT8_RECIPES)}; got {recipe!r}")
    if recipe in CALIBRATED_RECIPES:
        from earlyexit_kernels.engine.layers import ov_static

        missing = _missing_runtime(recipe)
        if missing is not None:
            raise ValueError(f"int8 recipe {recipe}: {missing}; or run the per-token-ort recipe (ONNX Runtime)")
        if not calibration and saved is None:
            raise ValueError(
                f"int8 recipe {recipe} sets its scales on calibration rows: eek fit --dtype int8 makes its layers on "
                "training rows and saves them in the folder, which then serves them (in Python: "
                "earlyexit_kernels.engine.layers.ov_static.static_int8_encoder(model, batches))"
            )
        quantized = model if inplace else copy.deepcopy(model)
        if saved is not None:
            return ov_static.load_static_layers(quantized, saved)
        return ov_static.static_int8_encoder(quantized, calibration)
    quantized = model if inplace else copy.deepcopy(model)
    if recipe in ("per-token-ort", "per-token-ov"):  # each encoder layer one graph, on ONNX Runtime or OpenVINO
        return _graph_encoder(quantized, recipe)
    linears = _encoder_linears(quantized)
    if not linears:
        raise ValueError(f"int8: {type(model).__name__} has no Linear layer in its encoder to quantize")
    config = quantized.config
    per_token = [
        (name, module)
        for name, module in linears
        if recipe == "per-token" or (recipe == "ffn-out-per-token" and _ffn_output(module, config))
    ]
    dynamic = {
        name: torch.ao.quantization.default_dynamic_qconfig
        for name, module in linears
        if recipe == "all" or (recipe in ("ffn-out-float", "ffn-out-per-token") and not _ffn_output(module, config))
    }
    with warnings.catch_warnings():
        # PyTorch's deprecation notices of torch.ao.quantization and its quantized tensors: ours to act on,
        # not something a user of eek can do anything about
        warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        for name, module in per_token:
            parent, _, leaf = name.rpartition(".")
            owner = quantized.base_model.get_submodule(parent) if parent else quantized.base_model
            setattr(owner, leaf, PerTokenInt8Linear.from_float(module))
        if dynamic:
            torch.ao.quantization.quantize_dynamic(quantized.base_model, dynamic, dtype=torch.qint8, inplace=True)
    quantized.eek_int8_recipe = recipe
    return quantized


def _graph_encoder(model: nn.Module, recipe: str) -> nn.Module:
    """``model`` with each encoder layer its runtime's graph layer (``per-token-ort``: :class:`OrtLayer`,
    ``per-token-ov``: :class:`~earlyexit_kernels.engine.layers.ov_layer.OvLayer`; int8 per token x per channel), in place."""
    from earlyexit_kernels.engine.layers import ov_layer

    missing = _missing_runtime(recipe)
    if recipe == "per-token-ort":
        instead = (
            "or run the same quantization on PyTorch's kernels, the per-token recipe (certify it with eek calibrate "
            "FOLDER FILE --dtype int8 where ONNX Runtime is not installed)"
        )
        run_on = run_on_ort
    else:
        instead, run_on = "or run the per-token-ort recipe (ONNX Runtime)", ov_layer.run_on_ov
    if missing is not None:
        raise ValueError(f"int8 recipe {recipe}: {missing}; {instead}")
    if encoder_layers(model) is None:
        raise ValueError(f"int8 recipe {recipe}: {type(model).__name__} has no encoder.layer list; run per-token")
    run_on(model, int8=True)
    model.eek_int8_recipe = recipe
    return model


def to_base(
    model: nn.Module,
    dtype: str | None = None,
    device: str | torch.device = "auto",
    *,
    int8_recipe: str = "auto",
    calibration: list[dict] | None = None,
    saved=None,
) -> nn.Module:
    """``model`` on ``device`` at ``dtype`` (None: as saved), in place where it can be (int8 swaps the
    encoder's Linear modules for quantized ones in place too, with ``int8_recipe``: ``"auto"``, the
    family's, or a key of :data:`INT8_RECIPES`, e.g. the one a folder's int8 certificate recorded;
    ``calibration`` and ``saved``: :func:`int8_encoder`'s). Returns the model."""
    target = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "int8":
        if target.type != "cpu":
            raise ValueError(
                f"dtype int8 runs on the CPU only (its int8 kernels are the CPU's); use --device cpu, or --dtype "
                f"bfloat16 on {target}"
            )
        recipe = _int8_recipe_of(model) if int8_recipe == "auto" else int8_recipe  # fails before any change
        model.float()
        return int8_encoder(model, recipe, inplace=True, calibration=calibration, saved=saved).to(target)
    if dtype == "bfloat16":
        return model.to(device=target, dtype=torch.bfloat16)
    if dtype == "float32":
        return model.to(device=target, dtype=torch.float32)
    return model.to(target)
