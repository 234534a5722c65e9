"""Static int8 encoder layers on OpenVINO: each layer quantized by NNCF on the activations of calibration rows.

    calibration = [dict(tokenizer(texts, padding=True, return_tensors="pt")) for texts in batches]
    static_int8_encoder(model, calibration)      # in place: each encoder layer a StaticOvLayer

Why: OpenVINO's static int8 model (``nncf.quantize`` with the transformer preset, what optimum-intel's
``OVQuantizer`` runs for Sentence Transformers' static int8 export) is the fastest CPU peer on an AMX Xeon: it
ran all six of MiniLM-L6's layers about as fast as early exit ran 2.45 on the per-token layers (docs/benchmarks.md,
"minilm-xeon-openvino"). Its products read activations whose scales were set before the call, where the
per-token layers (:mod:`~earlyexit_kernels.engine.layers.ov_layer`, :mod:`~earlyexit_kernels.engine.layers.ort_layer`)
find each row's range and the call's first. Early exit on the same static layers runs the layers the fastest
runtime runs, fewer of them.

How: each encoder layer is converted from its torch module by OpenVINO (``openvino.convert_model``, as a whole
model is converted) on the padded grid: inputs ``hidden`` [n, S, H], a 0/1 ``key_mask`` [n, S] and, for MPNet, the
``position_bias``. The attention is then the torch layer's own, which the plugin fuses as it fuses the whole
model's. ``nncf.quantize`` with ``model_type=TRANSFORMER`` then quantizes it on the inputs that layer met while the
float32 model ran the calibration batches at full depth (the activations NNCF records at that point of the whole
model): one scale per activation tensor, one per output channel for the weights, u8 x s8 products on the plugin's
int8 kernels (AMX or VNNI). Without VNNI the weights take 7 bits (NNCF's ``OverflowFix.ENABLE``), as every int8
layer of this package does there (:mod:`~earlyexit_kernels.engine.layers.int8_isa`).

A first form quantized the per-token layers' graph on packed tokens
(:func:`~earlyexit_kernels.engine.layers.ov_layer.ov_model`, ``int8=False``): the scatter onto the grid for the
attention, the split of the fused query-key-value product and the quantization of the graph's own input ran
unfused there, and the grid form was the faster in a scratch comparison on MiniLM-L6's layers (not committed). The
grid computes the padding's positions too; the engines call the layers on rows of close lengths (the length-sorted
batches, the continuous engine's cohorts), and splitting a call's rows by length into two calls was slower on
padded batches in a scratch comparison, so a call runs as it comes.

A static scale does not depend on the call: each token's output is the same whatever rows share its call.

Measured (docs/benchmarks.md, "Early exit on static int8 layers on the Intel Xeon"): on the Intel Xeon with AMX,
MiniLM-L6 fine-tuned on Rotten Tomatoes, one thread, 600 test texts in length-sorted batches of 32, these layers
ran the whole model in 1.31 s a pass against 1.16 s for OpenVINO's own static int8 model, and early exit on them
(2.49 of 6 layers) in 0.71 s, 1.63x OpenVINO's static int8
(``benchmarks/results/intel_xeon/stack_int8_static_ov_cpu``); against OpenVINO compiled at its faster setting
there (its fused-subgraph code generation off), 1.30x and 1.55x in two runs
(``benchmarks/results/intel_xeon/stack_int8_static_ov_best_peer_cpu``).

The calibration rows are the caller's: ``eek fit`` gives rows of its training split, never the rows that certify;
the folder keeps the layers (:func:`save_static_layers`), since they cannot be made from the weights alone.
Needs ``openvino``, ``onnx`` and ``nncf`` (the package's ``openvino`` extra).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_isa import int8_weight_bits
from earlyexit_kernels.engine.layers.ort_layer import (
    _key_mask,
    encoder_layers,
    layer_graph,
    layer_parts,
    ort_available,
    returns_tuple,
)
from earlyexit_kernels.engine.layers.ov_layer import OV_MISSING, OvLayer, _serialized, ov_available
from earlyexit_kernels.engine.layers.packed_call_shapes import LENGTH_STEP

__all__ = [
    "STATIC_RECIPE",
    "FOLDER",
    "STATIC_MISSING",
    "static_available",
    "calibration_feeds",
    "grid_inputs",
    "static_layer_ir",
    "StaticOvLayer",
    "layer_model",
    "static_int8_encoder",
    "save_static_layers",
    "load_static_layers",
    "set_exit_graph_choice",
]

#: the int8 recipe name of these layers (``eek_fit.json``'s ``int8_recipe``)
STATIC_RECIPE = "static-ov"
#: the folder, inside a model folder, that holds the layers' IR
FOLDER = "static_int8"

STATIC_MISSING = OV_MISSING.replace("openvino and onnx are", "openvino, onnx and nncf are") + " (with nncf)"


def static_available() -> bool:
    """Whether OpenVINO, ``onnx`` and NNCF are importable."""
    return ov_available() and importlib.util.find_spec("nncf") is not None


class _Wrapped(nn.Module):
    """A float encoder layer called with the graph's inputs: the padded grid, a 0/1 key mask [n, S] (turned into
    the additive mask the layer takes) and, for MPNet, the position bias."""

    def __init__(self, layer: nn.Module, position_bias: bool):
        super().__init__()
        self.layer, self.position_bias = layer, position_bias

    def forward(self, hidden, key_mask, position_bias=None):
        additive = (1.0 - key_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, additive, position_bias) if self.position_bias else self.layer(hidden, additive)
        return out[0] if isinstance(out, tuple) else out


def grid_inputs(
    hidden: torch.Tensor, key_mask: np.ndarray, position_bias: torch.Tensor | None, step: int = LENGTH_STEP
) -> dict:
    """The graph's inputs (numpy arrays by name), the grid padded to a length of a multiple of ``step`` (masked out;
    :data:`~earlyexit_kernels.engine.layers.packed_call_shapes.LENGTH_STEP` for the layers): the plugin prepares each
    new shape again, and the length of a batch's survivors is the batch's."""
    n, length, width = hidden.shape
    padded = -(-length // step) * step
    grid = hidden.detach().float().contiguous().numpy()
    if padded != length:
        grid = np.concatenate([grid, np.zeros((n, padded - length, width), np.float32)], axis=1)
        key_mask = np.concatenate([key_mask, np.zeros((n, padded - length), key_mask.dtype)], axis=1)
    feeds = {"hidden": grid, "key_mask": np.ascontiguousarray(key_mask, np.int32)}
    if position_bias is not None:
        bias = position_bias.detach().float().numpy()
        if padded != length:
            bias = np.pad(bias, ((0, 0), (0, 0), (0, padded - length), (0, padded - length)))
        feeds["position_bias"] = np.ascontiguousarray(bias)
    return feeds


def layer_model(layer: nn.Module, config, sample: dict):
    """The ``openvino.Model`` of ``layer`` (float32) on the padded grid, converted from the torch layer as OpenVINO
    converts a whole model (the attention is the torch layer's own, which the plugin fuses as in the whole model):
    inputs ``hidden`` [n, S, H], ``key_mask`` [n, S] int32 and, for MPNet, ``position_bias`` [n or 1, heads, S, S];
    output [n, S, H]. ``sample``: one call's inputs (:func:`grid_inputs`), to trace the layer with."""
    import openvino as ov

    position_bias = "position_bias" in sample
    width = config.hidden_size
    shapes = [("hidden", [-1, -1, width]), ("key_mask", [-1, -1])]
    if position_bias:
        shapes.append(("position_bias", [-1, config.num_attention_heads, -1, -1]))
    example = {name: torch.from_numpy(sample[name]) for name, _ in shapes}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the tracer's notes on the layer's Python branches
        model = ov.convert_model(_Wrapped(copy.deepcopy(layer).float().eval(), position_bias), example_input=example,
                                 input=shapes)  # fmt: skip
    for port, (name, _) in zip(model.inputs, shapes):
        port.get_tensor().set_names({name})
    return model


def calibration_feeds(model: nn.Module, batches: list[dict]) -> list[list[dict]]:
    """For each encoder layer of ``model``, the graph inputs (:func:`grid_inputs`) it met while a float32 copy of the
    model ran ``batches`` (the tokenizer's outputs: ``input_ids``, ``attention_mask``, ...) at full depth: the
    activations NNCF records at that point of the whole model. A patched model runs its class's own forward
    (``eek.patch`` sets the early-exit one on the instance), so every row reaches every layer."""
    plain = copy.deepcopy(model).float().eval()
    layers = encoder_layers(plain)
    if layers is None:
        raise ValueError(f"static int8: {type(model).__name__} has no encoder.layer list")
    recorded: list[list[dict]] = [[] for _ in layers]

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            bias = args[2] if len(args) > 2 else kwargs.get("position_bias")
            key_mask = _key_mask(mask, hidden.shape[0], hidden.shape[1])
            recorded[index].append(grid_inputs(hidden.clone(), key_mask, None if bias is None else bias.clone()))

        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    names = ("input_ids", "attention_mask", "token_type_ids")
    try:
        with torch.inference_mode():
            for batch in batches:
                type(plain).forward(plain, **{name: batch[name] for name in names if name in batch})
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def static_layer_ir(layer: nn.Module, config, feeds: list[dict], *, reduce_range: bool | None = None):
    """``layer`` (a float BERT-style or MPNet layer) as NNCF's static int8 model on the graph inputs ``feeds``:
    ``(ir, weight bits)``."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if not feeds:
        raise ValueError("static int8 needs calibration rows: no layer inputs were recorded")
    reduce_range = int8_weight_bits() == 7 if reduce_range is None else reduce_range
    model = layer_model(layer, config, feeds[0])
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # NNCF's progress lines, once per layer
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and its progress bars (rich, on stdout)
            quantized = nncf.quantize(
                model,
                nncf.Dataset(feeds),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(feeds),  # every call recorded: the statistics of all the calibration rows
                advanced_parameters=AdvancedQuantizationParameters(
                    # 7-bit weights where the CPU's u8 x s8 kernels add pairs in saturating 16-bit sums
                    overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.DISABLE
                ),
            )
    finally:
        nncf_logger.setLevel(level)
    return _serialized(quantized), 7 if reduce_range else 8


class StaticOvLayer(OvLayer):
    """An encoder layer run by OpenVINO's CPU plugin from NNCF's static int8 model of it (:func:`static_layer_ir`),
    called as the layer was: the padded grid in and out, zeros at the padding.

    :class:`~earlyexit_kernels.engine.layers.ov_layer.OvLayer`'s compilation, infer requests, copies and fallback,
    on the grid: a call OpenVINO fails (compiling its shape, its memory) runs on ONNX Runtime's per-token int8 graph
    of the same layer where onnxruntime was installed when the layer was made (another quantization: logged once
    per reason), else raises."""

    remake = "Fit the folder again on this CPU (eek fit --dtype int8: 7-bit weights)"
    fallback_form = "int8 per token, not the static layer's scales"

    def __init__(
        self,
        ir: tuple[bytes, bytes],
        *,
        position_bias: bool,
        returns_tuple: bool,
        weight_bits: int,
        fallback_graph: bytes | None = None,
        calibration_rows: int | None = None,
    ):
        super().__init__(
            ir,
            position_bias=position_bias,
            returns_tuple=returns_tuple,
            weight_bits=weight_bits,
            padded_shapes=False,  # the grid's length is padded by grid_inputs
            fallback_graph=fallback_graph,
        )
        self.calibration_rows = calibration_rows
        #: the CPU plugin's options the exit graph of these layers is compiled with over :func:`compile_config`'s,
        #: pairs of option and value (``eek fit`` times them: :func:`~earlyexit_kernels.engine.layers.
        #: runtime_choice.choose_exit_graph_settings`); the layers' own calls keep the defaults
        self.exit_graph_settings: tuple = ()
        #: False where ``eek fit`` timed the layers one call each faster than their exit graph on its CPU
        #: (:data:`~earlyexit_kernels.engine.layers.runtime_choice.LAYER_LOOP`): the graph is then never built
        self.exit_graph_on: bool = True

    @classmethod
    def from_layer(cls, layer: nn.Module, config, feeds: list[dict], *, reduce_range: bool | None = None, rows=None):
        """``layer`` (a float BERT-style or MPNet layer) quantized by NNCF on the graph inputs ``feeds`` (``rows``:
        how many calibration rows they hold, recorded)."""
        ir, bits = static_layer_ir(layer, config, feeds, reduce_range=reduce_range)
        return cls.of_ir(layer, config, ir, bits, rows)

    @classmethod
    def of_ir(cls, layer: nn.Module, config, ir: tuple[bytes, bytes], bits: int, calibration_rows: int | None = None):
        """The layer of the static model ``ir`` made of ``layer`` (the float layer: its family's inputs, and the
        fallback graph's weights)."""
        parts = layer_parts(layer, config)
        return cls(
            ir,
            position_bias=parts.position_bias,
            returns_tuple=returns_tuple(layer, parts),
            weight_bits=bits,
            fallback_graph=layer_graph(parts, int8=True, reduce_range=bits == 7) if ort_available() else None,
            calibration_rows=calibration_rows,
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_bias=None, *args, **kwargs):
        if hidden_states.device.type != "cpu":
            raise ValueError(f"the OpenVINO layer runs on the CPU; the hidden states are on {hidden_states.device}")
        n, length, _ = hidden_states.shape
        key_mask = _key_mask(attention_mask, n, length)
        if self.position_bias and position_bias is None:
            raise ValueError("this MPNet layer takes the position bias its encoder computes")
        bias = position_bias if self.position_bias else None
        feeds = grid_inputs(hidden_states, key_mask, bias)
        try:
            # the inputs read in place (the call waits for the result); the output read in place too
            # (share_outputs: infer would copy it otherwise), once, by the product below that zeroes the padding
            # into a new tensor before the request's next call reuses its memory
            result = self._request().infer(feeds, share_inputs=True, share_outputs=True)
            output = torch.from_numpy(result[0][:, :length])
        except RuntimeError as error:  # the runtime's own failure, not the call's input (checked above)
            output = self._packed_fallback(hidden_states, key_mask, bias, error)
        output = output * torch.from_numpy(key_mask[..., None]).to(output.dtype)  # zeros at the padding: a new tensor
        if hidden_states.dtype != torch.float32:
            output = output.to(hidden_states.dtype)
        return (output,) if self.returns_tuple else output

    def _packed_fallback(self, hidden_states, key_mask: np.ndarray, position_bias, error: RuntimeError):
        """A failed call's rows packed as the per-token graph takes them, run by :meth:`fallback_tokens`."""
        n, length, width = hidden_states.shape
        positions = np.flatnonzero(key_mask)
        grid = hidden_states.detach().float().reshape(n * length, width)
        feeds = {"tokens": grid[positions].numpy(), "positions": positions, "key_mask": key_mask}
        if position_bias is not None:
            feeds["position_bias"] = position_bias.detach().float().contiguous().numpy()
        tokens = torch.from_numpy(self.fallback_tokens(feeds, error))
        output = grid.new_zeros(n * length, width).index_copy_(0, torch.from_numpy(positions), tokens)
        return output.view(n, length, width)

    def __setstate__(self, state):
        state.setdefault("calibration_rows", None)
        state.setdefault("exit_graph_settings", ())  # pickled before the exit graph's settings were chosen
        state.setdefault("exit_graph_on", True)  # pickled before the graph was timed against the loop
        super().__setstate__(state)

    def __deepcopy__(self, memo):
        copied = StaticOvLayer(
            self.ir,
            position_bias=self.position_bias,
            returns_tuple=self.returns_tuple,
            weight_bits=self.weight_bits,
            fallback_graph=self.fallback_graph,
            calibration_rows=self.calibration_rows,
        )
        copied.exit_graph_settings = self.exit_graph_settings
        copied.exit_graph_on = self.exit_graph_on
        copied.train(self.training)
        return copied

    def extra_repr(self) -> str:
        rows = f", calibrated on {self.calibration_rows} rows" if self.calibration_rows else ""
        return f"OpenVINO, static int8 (NNCF), {self.weight_bits}-bit weights, {len(self.ir[1]) / 2**20:.1f} MiB{rows}"


def static_int8_encoder(model: nn.Module, batches: list[dict], *, reduce_range: bool | None = None) -> nn.Module:
    """``model`` with each encoder layer NNCF's static int8 layer on OpenVINO, calibrated on ``batches``, in place."""
    if not static_available():
        raise ValueError(f"static int8 layers: {STATIC_MISSING}")
    layers = encoder_layers(model)
    if layers is None:
        raise ValueError(f"static int8: {type(model).__name__} has no encoder.layer list")
    feeds = calibration_feeds(model, batches)
    rows = sum(len(batch["input_ids"]) for batch in batches)
    for index, layer in enumerate(layers):
        layers[index] = StaticOvLayer.from_layer(
            layer, model.config, feeds[index], reduce_range=reduce_range, rows=rows
        )
    model.eek_int8_recipe = STATIC_RECIPE
    return model


def save_static_layers(model: nn.Module | list, folder: str | Path) -> None:
    """Write ``model``'s static int8 layers (or the list of them) as OpenVINO IR to ``folder``/:data:`FOLDER`, with a
    record of their weight bits and calibration rows: what a folder certified on them serves
    (:func:`load_static_layers`)."""
    layers = model if isinstance(model, list) else encoder_layers(model)
    if not layers or not all(isinstance(layer, StaticOvLayer) for layer in layers):
        raise ValueError("the model's encoder layers are not static int8 layers (static_int8_encoder) to save")
    target = Path(folder) / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    for index, layer in enumerate(layers):
        xml, weights = layer.ir
        (target / f"layer_{index:02d}.xml").write_bytes(xml)
        (target / f"layer_{index:02d}.bin").write_bytes(weights)
    record = {
        "layers": len(layers),
        "weight_bits": sorted({layer.weight_bits for layer in layers}),
        "calibration_rows": getattr(layers[0], "calibration_rows", None),
        "form": "nncf.quantize(model_type=TRANSFORMER) of each encoder layer's graph on OpenVINO",
        # the plugin's options the exit graph is compiled with, timed by eek fit on this CPU (none: the defaults)
        "exit_graph_settings": dict(layers[0].exit_graph_settings),
        # false where eek fit timed the layers one call each faster than the exit graph on this CPU
        "exit_graph": bool(layers[0].exit_graph_on),
    }
    (target / "layers.json").write_text(json.dumps(record, indent=2) + "\n")


def set_exit_graph_choice(layers, settings: tuple, graph: bool = True) -> None:
    """The static int8 ``layers`` (a model's, or the ones a folder is about to save) carry how their exit graph is
    compiled (``settings``) and whether it runs at all (``graph``): the one place both are set."""
    for layer in layers:
        layer.exit_graph_settings = tuple(settings)
        layer.exit_graph_on = bool(graph)


def load_static_layers(model: nn.Module, folder: str | Path) -> nn.Module:
    """``model`` (the folder's float32 model) with each encoder layer the static int8 layer ``folder`` saved
    (:func:`save_static_layers`), in place; a ``ValueError`` saying what to do where the files are missing or are
    another model's."""
    if not static_available():
        raise ValueError(f"static int8 layers: {STATIC_MISSING}")
    source = Path(folder) / FOLDER
    layers = encoder_layers(model)
    if layers is None:
        raise ValueError(f"static int8: {type(model).__name__} has no encoder.layer list")
    try:
        record = json.loads((source / "layers.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{folder} names static int8 layers but {source}/layers.json cannot be read ({error}): fit the folder "
            "again with eek fit --dtype int8, or certify another int8 form on it (eek calibrate FOLDER ROWS --dtype "
            "int8 --layers onnxruntime)"
        ) from None
    if record.get("layers") != len(layers):
        raise ValueError(
            f"{source} holds {record.get('layers')} static int8 layers and the model has {len(layers)}: they are "
            "another model's; fit the folder again with eek fit --dtype int8"
        )
    bits = 7 if record.get("weight_bits") == [7] else 8
    graph_settings = record.get("exit_graph_settings", {})  # a folder from before the choice: the defaults
    if not isinstance(graph_settings, dict) or not all(isinstance(v, str) for v in graph_settings.values()):
        raise ValueError(
            f"{source}/layers.json's exit_graph_settings is {graph_settings!r}, not options and their text values: "
            "fit the folder again with eek fit --dtype int8"
        )
    graph_on = record.get("exit_graph", True)  # a folder from before the graph was timed against the loop: the graph
    if not isinstance(graph_on, bool):
        raise ValueError(
            f"{source}/layers.json's exit_graph is {graph_on!r}, not true or false: fit the folder again with eek fit "
            "--dtype int8"
        )
    for index, layer in enumerate(layers):
        name = source / f"layer_{index:02d}"
        try:
            ir = (name.with_suffix(".xml").read_bytes(), name.with_suffix(".bin").read_bytes())
        except OSError as error:
            raise ValueError(
                f"{source} lacks layer {index}'s files ({error}): fit the folder again with eek fit --dtype int8"
            ) from None
        layers[index] = StaticOvLayer.of_ir(layer, model.config, ir, bits, record.get("calibration_rows"))
    set_exit_graph_choice(layers, tuple(graph_settings.items()), graph_on)
    model.eek_int8_recipe = STATIC_RECIPE
    return model
