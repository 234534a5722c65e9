"""What a layer call costs around the runtime's run, at the rows a call holds at c1, c8 and on 32-text requests (issue 107).

Issue 107 asks that the per-call overhead be measured at c1, c8 and 32-text requests. On the CPU the engine's layer
call is the runtime's run (ONNX Runtime's or OpenVINO's session) plus what the engine does around it: packing the
call's tokens, the exit heads and the policy's step, the compaction of the rows that stay, Python between them; and,
once per text, the tokenization and the embeddings. Here ``eek.classify`` (the continuous engine ``eek classify`` and
``eek serve`` run) classifies the same texts with at most 1, 8 and 32 rows a call (``max_batch_size``: what one
request at a time, eight in flight and 32-text requests give the engine), and each int8 layer's runtime run is timed
where it is called (:meth:`~earlyexit_kernels.engine.layers.ort_layer.PackedGraphLayer.run_tokens`, wrapped on the
instance, nothing else changed). Per size:

- ``runtime_ms_per_call``: the runtime's run;
- ``outside_ms_per_call``: the rest of the wall time over the layer calls (everything above, per call);
- ``outside_share``: that rest over the wall time.

One untimed pass per size, then ``--rounds`` rounds in rotated order, medians reported::

    python benchmarks/micro/layer_call_overhead.py FOLDER --texts .cache/demo/test.csv --count 512 \\
        --rounds 3 --threads 1 --output FILE.json

FOLDER is an ``eek fit`` folder, loaded as ``eek classify --dtype int8`` loads it (its int8 layers' runtime as the
folder records it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.corpus_peers import read_texts, rotated_rounds
from benchmarks.suite.script_results import run_conditions, write_json
from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.engine.layers.ort_layer import PackedGraphLayer, encoder_layers

SIZES = (1, 8, 32)


class RuntimeClock:
    """The seconds and count of the runtime runs of ``model``'s packed layers, timed where each is called."""

    def __init__(self, model):
        self.seconds, self.calls = 0.0, 0
        layers = [layer for layer in encoder_layers(model) or [] if isinstance(layer, PackedGraphLayer)]
        if not layers:
            raise SystemExit("error: the model's layers do not run on a packed runtime (load it with dtype='int8')")
        for layer in layers:
            layer.run_tokens = self._timed(layer.run_tokens)

    def _timed(self, run):
        def timed(feeds):
            started = time.perf_counter()
            try:
                return run(feeds)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def measure(model, tokenizer, texts: list[str], sizes=SIZES, rounds: int = 3) -> dict:
    """For each size: the wall, runtime and call counts of ``eek.classify`` over ``texts`` at that many rows a call,
    round by round (one untimed pass first, the sizes' order rotated each round), and their medians."""
    clock = RuntimeClock(model)
    counted = {size: [] for size in sizes}  # each pass's runtime seconds, calls and row-layers, in order

    def at(size: int):
        def run():
            clock.reset()
            predictions = list(eek.classify(model, texts, tokenizer=tokenizer, max_batch_size=size))
            layers = sum(p.layers_run for p in predictions)  # row-layers computed
            counted[size].append({"runtime": clock.seconds, "calls": clock.calls, "layers": layers})

        return run

    runs = {size: at(size) for size in sizes}
    for run in runs.values():
        run()  # untimed: the sessions' first calls, the pool's allocation
    for passes in counted.values():
        passes.clear()
    walls = rotated_rounds(runs, rounds)
    passes = {size: [{**c, "wall": w} for c, w in zip(counted[size], walls[size], strict=True)] for size in sizes}
    out = {}
    for size, done in passes.items():
        runtime = [p["runtime"] / p["calls"] * 1e3 for p in done]
        outside = [(p["wall"] - p["runtime"]) / p["calls"] * 1e3 for p in done]
        out[str(size)] = {
            "calls": [p["calls"] for p in done],
            "rows_per_call": round(statistics.median(p["layers"] / p["calls"] for p in done), 2),
            "texts_per_s": [round(len(texts) / p["wall"], 1) for p in done],
            "runtime_ms_per_call": round(statistics.median(runtime), 3),
            "outside_ms_per_call": round(statistics.median(outside), 3),
            "outside_share": round(statistics.median((p["wall"] - p["runtime"]) / p["wall"] for p in done), 4),
            "pass_seconds": [round(p["wall"], 4) for p in done],
            "runtime_seconds": [round(p["runtime"], 4) for p in done],
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an eek fit folder")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column, or a .txt")
    parser.add_argument("--count", type=int, default=512, help="how many texts (default 512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.count < max(SIZES):
        parser.error(f"--rounds must be at least 1 and --count at least {max(SIZES)}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(str(args.folder), dtype="int8")
    texts = read_texts(args.texts)[: args.count]
    sizes = measure(model, tokenizer, texts, SIZES, args.rounds)
    result = {
        **run_conditions("benchmarks/micro/layer_call_overhead.py", argv, started),
        "what": "eek.classify's layer calls on int8 at most 1, 8 and 32 rows a call: the runtime's run against "
        "the rest of the wall time per call",
        "isa": int8_isa(),
        "folder": str(args.folder),
        "int8_recipe": getattr(model, "eek_int8_recipe", None),
        "texts": len(texts),
        "threads": args.threads,
        "rounds": args.rounds,
        "sizes": sizes,
    }
    write_json(args.output, result)
    for size, row in sizes.items():
        print(
            f"at most {size} rows a call ({row['rows_per_call']} on average): runtime {row['runtime_ms_per_call']:.2f}"
            f" ms a call, the rest {row['outside_ms_per_call']:.2f} ms ({row['outside_share']:.0%} of the time)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
