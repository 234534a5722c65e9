"""Where an int8 ONNX Runtime layer's time goes, by operator type: ONNX Runtime's own profiler on one session.

The ``per-token-ort`` layer (:func:`earlyexit_kernels.engine.layers.ort_layer.layer_graph`) of a classifier
folder's first encoder layer, int8, run as the engine runs it (the session options and the fusions left off) on
the packed tokens of batches of ``--rows`` Rotten Tomatoes test texts, length-sorted (``--order sorted``, as
``eek classify`` cuts a corpus) or in the file's order (``--order file``, as a server's requests arrive); the
hidden states drawn at random (an operator's time does not read their values). Each batch is run ``--repeats``
times; the kernel time of every node is summed by operator type::

    .venv/bin/python benchmarks/profiles/ort_layer_ops.py .cache/demo/model --texts .cache/demo/test.csv \\
        --count 320 --repeats 5 --threads 1

Prints each operator type's share of the kernels' time and its microseconds per real token, so that runs of
other call sizes or orders compare op by op (``--output``: the same as JSON). Read with issue 107's per-layer
target (the layer against ONNX Runtime int8's whole model): the shares of the per-token quantization's own operators (``Abs``,
``ReduceMax``, ``Max``, ``Div``, the ``Mul`` after the product) and of the packing for the attention
(``ConstantOfShape``, ``ScatterND``, ``Split``, ``Gather``) are what the whole-model graph does not run.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a BERT-style classifier folder")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column")
    parser.add_argument("--count", type=int, default=320, help="how many texts (default 320)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32, help="texts a layer call (default 32)")
    parser.add_argument(
        "--order", choices=("sorted", "file"), default="sorted", help="batches of length-sorted texts, or in file order"
    )
    parser.add_argument("--output", type=Path, help="a JSON file for the shares and microseconds per token")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.rows < 1 or args.count < 1 or args.repeats < 1:
        parser.error("--rows, --count and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.engine.layers import ort_layer

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    parts = ort_layer.layer_parts(model.base_model.encoder.layer[0], model.config)
    options = ort_layer.session_options(args.threads)
    options.enable_profiling = True
    # The profiler writes its JSON to a file; read back below, then removed with its folder.
    scratch = tempfile.TemporaryDirectory(prefix="eek-ort-layer-ops-")
    options.profile_file_prefix = os.path.join(scratch.name, "profile")
    session = ort.InferenceSession(
        ort_layer.layer_graph(parts, int8=True),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=ort_layer._UNFUSED,
    )
    texts = [str(t) for t in pd.read_csv(args.texts)["text"].tolist()[: args.count]]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
    if args.order == "sorted":
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
    generator = np.random.default_rng(0)
    tokens = 0
    slots = 0
    for start in range(0, len(texts), args.rows):
        mask = tokenizer(texts[start : start + args.rows], padding=True, truncation=True, max_length=512)[
            "attention_mask"
        ]
        key_mask = np.asarray(mask, np.int32)
        positions = np.flatnonzero(key_mask)
        hidden = generator.standard_normal((len(positions), parts.qkv_weight.shape[1])).astype(np.float32)
        feeds = {"tokens": hidden, "positions": positions, "key_mask": key_mask}
        tokens += len(positions)
        slots += key_mask.size
        for _ in range(args.repeats):
            session.run(None, feeds)
    with scratch:
        events = json.loads(Path(session.end_profiling()).read_text())
    by_type: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
    total = sum(by_type.values())
    runs = tokens * args.repeats
    if args.output is not None:  # written before the table is printed: a closed pipe (| head) loses no result
        from benchmarks.suite.script_results import run_conditions, write_json
        from earlyexit_kernels.bench.results import instruction_sets

        record = {
            **run_conditions("benchmarks/profiles/ort_layer_ops.py", argv, started),
            "instruction_sets": instruction_sets(),
            "onnxruntime": ort.__version__,
            **{key: getattr(args, key) for key in ("count", "repeats", "rows", "order")},
            "tokens": tokens,
            "padded_positions": slots,
            "us_per_token": total / runs,
            "ops": {
                name: {"share": micros / total, "us_per_token": micros / runs} for name, micros in by_type.most_common()
            },
        }
        write_json(args.output, record)
    print(
        f"{len(texts)} texts in calls of {args.rows} ({args.order}), {tokens} tokens in {slots} padded positions, "
        f"{args.repeats} runs each, {args.threads} thread(s): {total / 1e3:.1f} ms, {total / runs:.3f} us a token"
    )
    for name, micros in by_type.most_common():
        print(f"{name:<24} {100 * micros / total:5.1f}%  {micros / runs:.4f} us a token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
