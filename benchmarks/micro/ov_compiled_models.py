"""Where a static int8 layer loses to OpenVINO's whole model: one compiled model called L times against L compiled models.

Issue 107's per-layer target reads eek's static int8 layer (one OpenVINO compiled model per encoder layer:
:class:`~earlyexit_kernels.engine.layers.ov_static.StaticOvLayer`) against OpenVINO's static int8 whole model per
layer (``benchmarks/micro/ort_layer_per_layer.py --recipe static-ov``). This script asks what the separate compiled
models themselves cost, on the same calls, with no torch, masks or copies around them (each call's inputs made before
the timing, run by ``infer_request.infer`` as the layer runs them):

- ``one compiled model``: the first layer's compiled model called L times a batch, on each layer's own inputs;
- ``L compiled models of one layer``: L compilations of the same first layer (the same weights), one a layer;
- ``the L layers``: each layer's own compiled model, as eek runs them.

The first two compute the same thing with the same weights; what the second pays beyond the first is each compiled
model's own state (its memory for intermediate results, its generated kernels) met cold at every call, which a whole
model's layers share. The inputs are the hidden states each layer met when the float32 classifier ran the texts
(length-sorted batches of ``--batch``, longest first). One untimed pass each, then ``--rounds`` rounds in rotated
order; ratios are paired within a round::

    python benchmarks/micro/ov_compiled_models.py .cache/demo/model --texts .cache/demo/test.csv \\
        --calibration .cache/demo/validation.csv --count 640 --rounds 9 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.corpus_peers import read_texts, rotated_rounds, sorted_batches
from benchmarks.suite.script_results import run_conditions, write_json
from earlyexit_kernels.engine.layers.int8_isa import int8_isa

ONE, COPIES, LAYERS = "one compiled model", "L compiled models of one layer", "the L layers"
NAMES = (ONE, COPIES, LAYERS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a fine-tuned BERT-style classifier folder")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column, or a .txt")
    parser.add_argument("--calibration", type=Path, required=True, help="the texts the static layers calibrate on")
    parser.add_argument("--calibration-count", type=int, default=300)
    parser.add_argument("--count", type=int, default=640, help="how many texts (default 640)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.count < args.batch:
        parser.error("--rounds must be at least 1 and --count at least one --batch")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    import openvino
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.engine.layers.ov_layer import compile_config
    from earlyexit_kernels.engine.layers.ov_static import calibration_feeds, static_int8_encoder

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder, dtype=torch.float32).eval()
    if model.config.model_type == "mpnet":
        raise SystemExit("error: this script reads BERT-style layers (MPNet's take the encoder's position bias)")
    limit = min(model.config.max_position_embeddings, tokenizer.model_max_length or 512)

    def batches_of(texts):
        return [
            dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
            for _, chunk in sorted_batches(tokenizer, texts, args.batch, limit)
        ]

    batches = batches_of(read_texts(args.texts)[: args.count])
    calibration = batches_of(read_texts(args.calibration)[: args.calibration_count])
    feeds = calibration_feeds(model, batches)  # [layer][batch]: each layer's inputs at full depth, as its calls
    layers = static_int8_encoder(model, calibration).base_model.encoder.layer
    depth = len(layers)
    core, config = openvino.Core(), compile_config(args.threads)  # the layers' own compilation options

    def compiled(ir):
        return core.compile_model(core.read_model(*ir), "CPU", config).create_infer_request()

    one = compiled(layers[0].ir)
    requests = {ONE: [one] * depth, COPIES: [compiled(layers[0].ir) for _ in range(depth)]}
    requests[LAYERS] = [compiled(layer.ir) for layer in layers]

    def run(chosen):
        def passes():
            for index in range(len(batches)):
                for request, layer_feeds in zip(chosen, feeds, strict=True):
                    request.infer(layer_feeds[index], share_inputs=True)

        return passes

    runs = {name: run(chosen) for name, chosen in requests.items()}
    for passes in runs.values():  # untimed: each compiled model's shapes
        passes()
    seconds = rotated_rounds(runs, args.rounds)
    ratios = {
        f"{name} / {ONE}": [round(a / b, 4) for a, b in zip(seconds[name], seconds[ONE], strict=True)]
        for name in (COPIES, LAYERS)
    }
    result = {
        **run_conditions("benchmarks/micro/ov_compiled_models.py", argv, started),
        "what": "OpenVINO static int8 layer calls: one compiled model called L times a batch against L compiled "
        "models of the same layer and against the L layers' own, on each layer's inputs at full depth",
        "isa": int8_isa(),
        "folder": str(args.folder),
        "texts": sum(len(b["input_ids"]) for b in batches),
        "batch": args.batch,
        "layers": depth,
        "pass_seconds": seconds,
        "ratio_per_round": ratios,
        "ratio_median": {name: statistics.median(values) for name, values in ratios.items()},
    }
    write_json(args.output, result)
    print(f"{result['texts']} texts, {depth} layers, {args.rounds} rounds, {args.threads} thread(s), {int8_isa()} CPU")
    for name, values in seconds.items():
        print(f"  {name}: {statistics.median(values) * 1e3:.1f} ms a pass")
    for name, values in ratios.items():
        print(f"  {name}: {statistics.median(values):.3f} (rounds {min(values):.3f}-{max(values):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
