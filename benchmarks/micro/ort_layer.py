"""One encoder layer's time, int8 on PyTorch's kernels against the same layer on ONNX Runtime, row count by row count.

The first layer of a classifier folder (float32, no early exit), called as the engine calls it
(hidden states [n, S, H] and the layer's mask) at one thread, alone on the machine:

- ``torch float32``: the layer as it is;
- ``torch int8 per-token``: its Linear layers ``PerTokenInt8Linear`` (the ``per-token`` recipe,
  fbgemm's dynamic int8 kernel);
- ``ONNX Runtime int8 per-token``: ``OrtLayer`` (the ``per-token-ort`` recipe: the same quantization,
  one ONNX Runtime graph);
- ``ONNX Runtime float32``: ``OrtLayer`` with ``int8=False``.

Milliseconds per call (the median of 5 repeats of a timed loop), and the int8 layer's speed-up on
ONNX Runtime over PyTorch's. Also the output's RMS difference from the float32 layer, for each int8
layer and between the two::

    flock -x /tmp/eek-cpu.lock python benchmarks/micro/ort_layer.py FOLDER --rows 1 2 4 8 32 --length 40

``--norms``: instead, why the graph writes its layer norms out: ``LayerNorm(x + r)`` on [8 x 40, H]
as ONNX Runtime's LayerNormalization, as the elementary operations ``OrtLayer``'s graph uses
(``_Graph.norm``, its session's fusions off), and as torch's ``layer_norm``, microseconds per call.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

from earlyexit_kernels.engine.layers.ort_layer import _UNFUSED, OrtLayer, _Graph
from earlyexit_kernels.engine.layers.precision import int8_encoder


def layer_call(layer, model, hidden, mask):
    """The layer called as its encoder calls it: the additive mask, MPNet's position bias."""
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    if model.config.model_type == "mpnet":
        bias = model.base_model.encoder.compute_position_bias(hidden[:1])
        return lambda: layer(hidden, additive, bias)[0]
    return lambda: layer(hidden, additive)


def milliseconds(call, rows: int) -> float:
    repeats = max(5, 400 // rows)
    for _ in range(5):
        call()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(times)


def norm_times(hidden: int, rows: int = 320) -> dict[str, float]:
    """Microseconds per ``LayerNorm(x + r)`` of [rows, H]: ONNX Runtime's kernel, the graph's operations, torch."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    norm = torch.nn.LayerNorm(hidden, eps=1e-12)
    x, r = (torch.randn(rows, hidden, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    feeds = {"x": x.numpy(), "r": r.numpy()}

    def session(graph: _Graph, fused: bool):
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["t", hidden]) for n in ("x", "r")]
        model = helper.make_model(
            helper.make_graph(graph.nodes, "norm", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", hidden])], graph.initializers),
            opset_imports=[helper.make_opsetid("", 18)],
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, disabled_optimizers=[] if fused else _UNFUSED)

    kernel = _Graph()
    summed = kernel.node("Add", ["x", "r"], "z")
    kernel.node("LayerNormalization", [summed, kernel.const("g", norm.weight.detach()), kernel.const("b", norm.bias.detach())], "y", axis=-1, epsilon=norm.eps)  # fmt: skip
    operations = _Graph()
    written = operations.norm("n", "x", torch.zeros(hidden), "r", norm)
    operations.node("Identity", [written], "y")
    fused, written_out = session(kernel, True), session(operations, False)
    calls = {
        "ONNX Runtime LayerNormalization": lambda: fused.run(None, feeds),
        "elementary operations (the graph's)": lambda: written_out.run(None, feeds),
        "torch layer_norm": lambda: torch.nn.functional.layer_norm(x + r, (hidden,), norm.weight, norm.bias, norm.eps),
    }
    with torch.inference_mode():
        return {name: 1e3 * milliseconds(call, 64) for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--length", type=int, default=40, help="tokens a row (no padding)")
    parser.add_argument("--norms", action="store_true", help="time the layer norm three ways instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    if args.norms:
        for name, us in norm_times(model.config.hidden_size).items():
            print(f"LayerNorm(x + r) on [320, {model.config.hidden_size}], {name}: {us:.0f} us")
        return
    layer = model.base_model.encoder.layer[0]
    layers = {
        "torch float32": layer,
        "torch int8 per-token": int8_encoder(model, "per-token").base_model.encoder.layer[0],
        "ONNX Runtime int8 per-token": OrtLayer.from_layer(layer, model.config),
        "ONNX Runtime float32": OrtLayer.from_layer(layer, model.config, int8=False),
    }
    print(f"{args.folder}: layer 1, {args.length} tokens a row, 1 thread; ms per call")
    print("| rows | " + " | ".join(layers) + " | int8: ONNX Runtime over torch |")
    print("|---:|" + "---:|" * (len(layers) + 1))
    with torch.inference_mode():
        for rows in args.rows:
            hidden = torch.randn(
                rows, args.length, model.config.hidden_size, generator=torch.Generator().manual_seed(0)
            )
            mask = torch.ones(rows, args.length, dtype=torch.bool)
            times = {name: milliseconds(layer_call(m, model, hidden, mask), rows) for name, m in layers.items()}
            ratio = times["torch int8 per-token"] / times["ONNX Runtime int8 per-token"]
            print(f"| {rows} | " + " | ".join(f"{t:.3f}" for t in times.values()) + f" | {ratio:.2f}x |", flush=True)
        hidden = torch.randn(8, args.length, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        outputs = {name: layer_call(m, model, hidden, torch.ones(8, args.length, dtype=torch.bool))() for name, m in layers.items()}  # fmt: skip

    def rms(a, b):
        return float((outputs[a] - outputs[b]).pow(2).mean().sqrt())

    print(
        f"RMS difference from torch float32 (8 rows): torch int8 {rms('torch int8 per-token', 'torch float32'):.2e}, "
        f"ONNX Runtime int8 {rms('ONNX Runtime int8 per-token', 'torch float32'):.2e}; between the two int8 layers "
        f"{rms('ONNX Runtime int8 per-token', 'torch int8 per-token'):.2e}; ONNX Runtime float32 "
        f"{rms('ONNX Runtime float32', 'torch float32'):.2e}"
    )


if __name__ == "__main__":
    main()
