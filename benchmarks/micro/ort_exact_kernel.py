"""What ONNX Runtime's exact u8 x u8 kernel (``session.x64quantprecision``) costs one int8 layer, in turn with
the session without it.

The ONNX Runtime int8 layer of all-MiniLM-L6-v2's first encoder layer (``OrtLayer``, this CPU's int8 form) in
two sessions, one with the option and one without, called in turn on 8 rows of up to 54 tokens, one thread:
the median ms a call over 30 rounds of 10 calls each. With 8-bit weights (the ``vnni`` class) the option moves
them to the slower u8 kernel; with 7-bit weights it leaves them, which is why ``session_options`` sets it only
without VNNI. Run it alone:

    python benchmarks/micro/ort_exact_kernel.py
"""

import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ov_layer import minilm, padded_call  # noqa: E402

from earlyexit_kernels.engine.layers import ort_layer  # noqa: E402
from earlyexit_kernels.engine.layers.int8_isa import int8_isa, int8_weight_bits  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    import onnxruntime as ort

    torch.set_num_threads(1)
    model, source = minilm()
    layer = model.encoder.layer[0]
    hidden, mask = padded_call(8, 54, model.config.hidden_size)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    layers = {}
    for exact in (False, True):
        graph_layer = ort_layer.OrtLayer.from_layer(layer, model.config)
        options = ort_layer.session_options(1)
        options.add_session_config_entry("session.x64quantprecision", "1" if exact else "0")
        graph_layer._session = ort.InferenceSession(
            graph_layer.graph, options, providers=["CPUExecutionProvider"], disabled_optimizers=ort_layer._UNFUSED
        )
        graph_layer._threads = 1
        layers[exact] = graph_layer
    times = {exact: [] for exact in layers}
    with torch.no_grad():
        for _ in range(30):
            for exact, graph_layer in layers.items():
                start = time.perf_counter()
                for _ in range(10):
                    graph_layer(hidden, additive)
                times[exact].append((time.perf_counter() - start) / 10 * 1e3)
    print(
        f"{source}, first layer int8, 8 rows of up to 54 tokens, 1 thread; int8 class {int8_isa()}, "
        f"{int8_weight_bits()}-bit weights"
    )
    for exact, values in times.items():
        print(f"session.x64quantprecision={int(exact)}: {statistics.median(values):.2f} ms a call")


if __name__ == "__main__":
    main()
