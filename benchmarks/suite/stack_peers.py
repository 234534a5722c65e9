"""The stack benchmark's peers (``python -m benchmarks.suite.stack``): what a user runs instead of early exit, each
at its best settings on this CPU, as :class:`Config` rows beside the stack's own.

- the classifier exported to ONNX (:func:`export_onnx`; the eager attention, which ONNX Runtime's optimizer fuses);
- ONNX Runtime fp32 and dynamic int8 on the graph its transformer optimizer fused (BERT fusions);
- OpenVINO fp32 on the exported graph and, where NNCF is installed, static int8 (:func:`openvino_int8`:
  ``nncf.quantize`` with the transformer preset on calibration texts that are never the ones scored), each compiled
  with and without the plugin's fused-subgraph code generation and the faster kept (:func:`openvino_compiled`).

The corpus, serving and per-layer benchmarks build their peers here too, so every figure against a peer names the
same peer.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "INPUTS",
    "SETTING_ROUNDS",
    "SNIPPETS_OFF",
    "Config",
    "export_onnx",
    "numpy_inputs",
    "openvino_compiled",
    "openvino_int8",
    "peer_configs",
    "peer_status",
]

#: the tokenizer's outputs a classifier reads, in the exported graph's input order
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Config:
    """One way to classify a batch: ``run(batch) -> (logits [n, C] float32, layers run [n] or None)``.

    ``base``: the configuration without early exit that this one adds early exit to (itself otherwise).
    """

    name: str
    base: str
    early_exit: bool
    run: Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]]


def peer_status() -> dict[str, str]:
    """For each peer package, ``"installed"`` or why the stack skips its rows."""
    status = {}
    for package in ("onnx", "onnxruntime", "openvino", "nncf"):
        status[package] = "installed" if importlib.util.find_spec(package) else f"not installed (pip install {package})"
    return status


def export_onnx(full, batch: dict, folder: Path) -> Path:
    """``full`` (an unpatched classifier) exported to ``folder/model.onnx`` with its eager attention, rows and length
    dynamic, traced on two rows of ``batch``: the graph every ONNX Runtime and OpenVINO peer starts from."""
    path = folder / "model.onnx"
    names = [name for name in INPUTS if name in batch]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    inputs = tuple(batch[name][:2] for name in names)
    kwargs = dict(input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17)
    # ONNX Runtime's optimizer fuses the attention of the eager graph (not of SDPA's)
    full = copy.deepcopy(full)
    full.set_attn_implementation("eager")
    try:
        torch.onnx.export(full, inputs, str(path), dynamo=False, **kwargs)
    except TypeError:  # a torch whose exporter has no dynamo= switch
        torch.onnx.export(full, inputs, str(path), **kwargs)
    return path


def numpy_inputs(batch: dict) -> dict:
    """``batch``'s tokenizer outputs the exported graph reads, as numpy arrays (a runtime's feed)."""
    return {name: batch[name].numpy() for name in INPUTS if name in batch}


def peer_configs(
    full, sample: dict, folder: Path, threads: int, calibration: list[dict] | None = None
) -> tuple[list[Config], dict[str, str]]:
    """ONNX Runtime fp32 and int8 on the optimized graph, OpenVINO fp32 and, with ``calibration`` (batches of
    texts that are not the test's) and NNCF, static int8: the peers that are installed.

    Returns the configurations and, per peer, what was done or why it was skipped.
    """
    status = peer_status()
    notes, configs = {}, []
    if status["onnx"] != "installed":
        return [], {"onnxruntime": status["onnx"], "openvino": status["onnx"]}
    exported = export_onnx(full, sample, folder)
    config = full.config
    if status["onnxruntime"] == "installed":
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers import optimizer

        optimized = folder / "model-optimized.onnx"
        fused = optimizer.optimize_model(
            str(exported), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
        fused.save_model_to_file(str(optimized))
        quantized = folder / "model-optimized-int8.onnx"
        import onnx

        # (the fused ops are of another domain: shape inference cannot type their outputs)
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        quantize_dynamic(str(optimized), str(quantized), weight_type=QuantType.QInt8, extra_options=extra)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # Its threads would otherwise spin after each run and take the cores from the next configuration.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, path in (("ONNX Runtime fp32", optimized), ("ONNX Runtime int8", quantized)):
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            configs.append(Config(name, name, False, _ort_run(session)))
        notes["onnxruntime"] = (
            f"onnxruntime {onnxruntime.__version__}: transformers optimizer (model_type bert, fusions: "
            f"{_fusions(fused)}), int8 by quantize_dynamic (QInt8 weights)"
        )
    else:
        notes["onnxruntime"] = status["onnxruntime"]
    if status["openvino"] == "installed":
        import openvino

        core = openvino.Core()
        compiled, setting = openvino_compiled(core, core.read_model(str(exported)), threads, calibration or [sample])
        configs.append(Config("OpenVINO fp32", "OpenVINO fp32", False, _openvino_run(compiled)))
        notes["openvino"] = (
            f"openvino {openvino.__version__}: the exported graph, INFERENCE_PRECISION_HINT f32, LATENCY hint; {setting}"
        )
        if status["nncf"] != "installed":
            notes["openvino int8"] = status["nncf"]
        elif not calibration:
            notes["openvino int8"] = "no calibration texts given"
        else:
            config, setting = openvino_int8(core, exported, calibration, threads)
            configs.append(config)
            notes["openvino int8"] = (
                f"nncf {importlib.metadata.version('nncf')}: static int8, nncf.quantize(model_type=TRANSFORMER) on "
                f"{sum(len(b['input_ids']) for b in calibration)} validation texts, INFERENCE_PRECISION_HINT f32, "
                f"LATENCY hint; {setting}"
            )
    else:
        notes["openvino"] = status["openvino"]
    return configs, notes


#: the CPU plugin's code generation of fused subgraphs (attention, chains of element-wise ops), on by default.
#: Off, OpenVINO's static int8 MiniLM-L6 ran its calibration batches in 460 ms against 496 on the Intel Xeon with AMX
#: (benchmarks/results/intel_xeon/stack_int8_static_ov_best_peer_cpu), so each OpenVINO peer is compiled both ways
#: and the faster kept: a peer at its best setting on the CPU it runs on.
SNIPPETS_OFF = {"SNIPPETS_MODE": "DISABLE"}
#: alternating passes over the timing batches that choose an OpenVINO peer's setting
SETTING_ROUNDS = 3


def openvino_compiled(core, model, threads: int, batches: list[dict]):
    """``(compiled model, what was chosen and why)``: ``model`` compiled for ``threads`` threads with the latency
    hint and float32 where it stays float, with the plugin's fused-subgraph code generation on (its default) and off
    (:data:`SNIPPETS_OFF`), the faster kept: a peer at its best setting on this CPU. Both are timed in
    :data:`SETTING_ROUNDS` alternating passes over ``batches`` (after one untimed pass each: its shapes), the
    setting of the smaller median kept. ``batches``: the texts timed (the calibration's where there are some: a
    setting is chosen on texts that are never the ones scored)."""
    base = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    candidates = {"default": core.compile_model(model, "CPU", base)}
    try:
        candidates["fused-subgraph code generation off"] = core.compile_model(model, "CPU", {**base, **SNIPPETS_OFF})
    except RuntimeError as error:  # a version without the property: the default is all there is
        return candidates["default"], f"the plugin's default (SNIPPETS_MODE not accepted: {str(error).splitlines()[0]})"
    feeds = [numpy_inputs(batch) for batch in batches]
    seconds = {name: [] for name in candidates}
    for round_ in range(SETTING_ROUNDS + 1):
        names = list(candidates) if round_ % 2 == 0 else list(reversed(candidates))
        for name in names:
            start = time.perf_counter()
            for feed in feeds:
                candidates[name](feed)
            if round_:  # the first round compiles the batches' shapes
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    kept = min(medians, key=medians.get)
    timings = ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in medians.items())
    note = f"setting kept: {kept} (median of {SETTING_ROUNDS} passes over {len(feeds)} calibration batches: {timings})"
    return candidates[kept], note


def openvino_int8(core, exported: Path, calibration: list[dict], threads: int) -> tuple[Config, str]:
    """OpenVINO static int8: the exported graph quantized by NNCF on ``calibration``'s batches (activations'
    ranges from them, the transformer preset: attention's softmax and layer norms stay float), compiled at its
    best setting on this CPU (:func:`openvino_compiled`, timed on the same batches). ``(config, setting note)``."""
    import nncf

    model = core.read_model(str(exported))
    dataset = nncf.Dataset(calibration, numpy_inputs)
    quantized = nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),  # every batch given: the statistics of all its texts
    )
    compiled, setting = openvino_compiled(core, quantized, threads, calibration)
    return Config("OpenVINO int8", "OpenVINO int8", False, _openvino_run(compiled)), setting


def _fusions(optimized) -> str:
    counts = optimized.get_fused_operator_statistics()
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def _ort_run(session):
    def run(batch):
        return torch.from_numpy(session.run(["logits"], numpy_inputs(batch))[0]).float(), None

    return run


def _openvino_run(compiled):
    output = compiled.output(0)

    def run(batch):
        return torch.from_numpy(compiled(numpy_inputs(batch))[output]).float(), None

    return run
