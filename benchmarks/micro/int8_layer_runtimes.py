"""The whole int8 model on each runtime's layers, in one process: ONNX Runtime's against OpenVINO's, in turn.

The fine-tuned classifier at full depth (no early exit) on the first ``--count`` Rotten Tomatoes test
texts in the length-sorted batches of 32 the stack benchmark uses, one thread: each encoder layer an
``OrtLayer`` (the ``per-token-ort`` recipe) or an ``OvLayer`` (``per-token-ov``), one warm-up pass of
each, then ``--rounds`` timed passes of each in turn; the median seconds a pass. ``--mode``: under
``torch.no_grad`` or ``torch.inference_mode`` (whose tensors keep no version counter, so the layers read
the mask at every call). Run it alone:

    python benchmarks/micro/int8_layer_runtimes.py .cache/minilm-rt-a46e45ccb79e --mode no_grad
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from int8_recipes import batches  # noqa: E402

from earlyexit_kernels.demo.real_task import load_rotten_tomatoes  # noqa: E402
from earlyexit_kernels.engine.layers.precision import int8_encoder  # noqa: E402

warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")
RECIPES = ("per-token-ort", "per-token-ov")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a fine-tuned sequence classifier folder")
    parser.add_argument("--count", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("no_grad", "inference_mode"), default="no_grad")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    data = [batch for batch, _ in batches(tokenizer, load_rotten_tomatoes(0)["test"], args.count)]
    models = {recipe: int8_encoder(model, recipe) for recipe in RECIPES}
    seconds = {recipe: [] for recipe in RECIPES}
    with getattr(torch, args.mode)():
        for quantized in models.values():
            for batch in data:
                quantized(**batch)
        for _ in range(args.rounds):
            for recipe, quantized in models.items():
                start = time.perf_counter()
                for batch in data:
                    quantized(**batch)
                seconds[recipe].append(time.perf_counter() - start)
    medians = {recipe: statistics.median(values) for recipe, values in seconds.items()}
    print(f"{args.folder}: the first {args.count} test texts, full depth, 1 thread, {args.mode}, {args.rounds} rounds")
    for recipe, median in medians.items():
        print(f"{recipe:<14} {median:6.3f} s a pass  {medians['per-token-ort'] / median:5.2f}x per-token-ort")


if __name__ == "__main__":
    main()
