"""What shrinking ONNX Runtime's arena costs a served model, and what it hands back (issue 79).

``eek serve``'s memory trim asks every 10 s that each ONNX Runtime layer's next call shrink the
shared arena (``ort_layer.request_arena_shrink``): the call that carries the request frees the
arena's idle regions when it ends, and the call after it extends the arena again. This times, for
a served folder's encoder layers run on ONNX Runtime (int8 or float32) on one thread, a stack of
layer calls of each shape: steady (the median of ``--repeats``), the call that carries a shrink and
the call after it (medians over ``--shrinks``), and the cost of one shrink every 10 s as a share of
a server that runs such calls back to back. Then the resident memory after a large call, without
and with a shrink.

    python benchmarks/profiles/arena_shrink_cost.py bench-results/serve-peers/eek-minilm-rt-int8 --int8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from earlyexit_kernels.engine.layers.ort_layer import encoder_layers, request_arena_shrink, run_on_ort
from earlyexit_kernels.integrations.server.memory_trim import _glibc_malloc_trim, resident_bytes

INTERVAL_S = 10.0  # the memory trim's default


def stack(model, layers, rows: int, length: int) -> float:
    """Seconds for one call of every layer on ``rows`` x ``length`` tokens (the encoder's masks)."""
    hidden = torch.randn(rows, length, model.config.hidden_size)
    mask = torch.zeros(rows, 1, 1, length)  # additive: every position attended
    bias = None
    if model.config.model_type == "mpnet":
        bias = model.base_model.encoder.compute_position_bias(hidden)
    start = time.perf_counter()
    with torch.no_grad():
        for layer in layers:
            out = layer(hidden, mask) if bias is None else layer(hidden, mask, bias)
            hidden = out[0] if isinstance(out, tuple) else out
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a served model folder (eek fit's output)")
    parser.add_argument("--int8", action="store_true", help="the int8 layers (else float32)")
    parser.add_argument("--shapes", default="8x32,32x48,64x128", help="rows x length of the calls timed")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shrinks", type=int, default=15)
    args = parser.parse_args(argv)
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    run_on_ort(model, int8=args.int8)
    layers = list(encoder_layers(model))
    print(
        f"{args.folder}: {len(layers)} layers on ONNX Runtime, {'int8' if args.int8 else 'float32'}, 1 thread; "
        f"one shrink every {INTERVAL_S:g} s"
    )
    for shape in args.shapes.split(","):
        rows, length = (int(v) for v in shape.split("x"))
        for _ in range(5):
            stack(model, layers, rows, length)
        steady = statistics.median(stack(model, layers, rows, length) for _ in range(args.repeats))
        carrying, after = [], []
        for _ in range(args.shrinks):
            request_arena_shrink()
            carrying.append(stack(model, layers, rows, length))
            after.append(stack(model, layers, rows, length))
            for _ in range(3):
                stack(model, layers, rows, length)
        extra = statistics.median(carrying) + statistics.median(after) - 2 * steady
        print(
            f"  {rows} x {length}: steady {steady * 1e3:.2f} ms a stack; the stack carrying a shrink "
            f"{statistics.median(carrying) * 1e3:.2f} ms, the next {statistics.median(after) * 1e3:.2f} ms; "
            f"{extra * 1e3:+.2f} ms a shrink, {extra / INTERVAL_S:+.4%} of a server busy with such calls"
        )
    trim = _glibc_malloc_trim()
    if trim is not None:
        stack(model, layers, 2, 16)
        request_arena_shrink()
        stack(model, layers, 2, 16)
        trim(0)
        base = resident_bytes()
        stack(model, layers, 64, 256)
        trim(0)
        grown = resident_bytes()
        stack(model, layers, 2, 16)
        trim(0)
        kept = resident_bytes()
        request_arena_shrink()
        stack(model, layers, 2, 16)
        trim(0)
        shrunk = resident_bytes()
        print(
            f"  resident: {base / 2**20:.0f} MiB; after one 64 x 256 call {grown / 2**20:.0f} MiB; after a small "
            f"call {kept / 2**20:.0f} MiB without a shrink, {shrunk / 2**20:.0f} MiB with one"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
