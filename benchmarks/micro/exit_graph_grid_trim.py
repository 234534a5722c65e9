"""The exit graph with and without its grid trimming: whether cutting each later layer's grid pays on real batches.

The exit graph (:mod:`~earlyexit_kernels.engine.step.ov_exit_graph`) cuts each later layer's grid to the positions
its rows going on need, as the exact loop does. This builds a second graph of the same model whose later layers run
on the first layer's grid (the cut left out, everything else the same) and times both on the same calls: an
``eek fit`` folder fitted on the static layers (``--layers openvino-static``), loaded as it is served (``--dtype
int8``), its own policy; ``--count`` texts in calls of ``--size`` rows, either in the file's order (as requests
arrive) or sorted by token count, longest first (as the stack benchmark and ``eek classify`` batch a corpus),
tokenized before the timing. Per order, one untimed pass each way, then ``--rounds`` rounds alternating which runs
first; the ratio (the untrimmed graph's time / the trimmed one's, above 1 where the trimming pays) is paired within a
round, its median and range reported, with the trimmed graph's mean grid length at each layer::

    python benchmarks/micro/exit_graph_grid_trim.py FOLDER --texts rt-test.txt --count 600 --size 32 \\
        --orders sorted file --rounds 16 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root


def untrimmed_graph(model, call: dict):
    """The exit graph of ``model`` (patched on the static layers) built without the cut between layers: every
    later layer runs on the grid the first one ran on, with the rows going on. One ``call`` (the model's inputs)
    runs first, to read the adapter and heads the forward hands the graph."""
    from earlyexit_kernels.engine.step import ov_exit_graph

    seen = []
    original = ov_exit_graph.exit_graph

    def spy(*args):
        seen.append(args)
        return original(*args)

    kept_rule, kept_trim = ov_exit_graph.GRAPH_MIN_POSITIONS, ov_exit_graph._trimmed
    ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS = spy, 0
    try:
        with torch.inference_mode():
            model(**call)
        if not seen:
            raise SystemExit("the forward did not reach the exit graph: is the folder on the static int8 layers?")
        ov_exit_graph._trimmed = lambda source, length, axes: source  # the cut left out, nothing else changed
        return ov_exit_graph.ExitGraph(*seen[0])
    finally:
        ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS = original, kept_rule
        ov_exit_graph._trimmed = kept_trim


def measure(model, untrimmed, calls: list[dict], rounds: int) -> dict:
    """One order's reading: ``calls`` run through the model's own (trimmed) graph and through ``untrimmed``
    (:func:`untrimmed_graph`), ``rounds`` alternating rounds after one untimed pass each; the graph on every call
    whatever its size."""
    from earlyexit_kernels.engine.step import ov_exit_graph

    original, kept_rule = ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS
    graphs = {"trimmed": original, "untrimmed": lambda *args: untrimmed}
    lengths: list[list[int]] = []  # each call's grid length at each layer, the trimmed graph's (untimed pass)
    seconds: dict[str, list[float]] = {name: [] for name in graphs}
    runs = {}
    ov_exit_graph.GRAPH_MIN_POSITIONS = 0
    try:
        with torch.inference_mode():
            for name, graph_of in graphs.items():
                ov_exit_graph.exit_graph = _lengths_read(graph_of, lengths) if name == "trimmed" else graph_of
                out = [model(**call) for call in calls]
                runs[name] = (torch.cat([o.logits for o in out]), torch.cat([o.exit_layer for o in out]))
            for round_ in range(rounds):
                for name in ("trimmed", "untrimmed") if round_ % 2 == 0 else ("untrimmed", "trimmed"):
                    ov_exit_graph.exit_graph = graphs[name]
                    start = time.perf_counter()
                    for call in calls:
                        model(**call)
                    seconds[name].append(time.perf_counter() - start)
    finally:
        ov_exit_graph.exit_graph, ov_exit_graph.GRAPH_MIN_POSITIONS = original, kept_rule
    texts = sum(len(call["input_ids"]) for call in calls)
    ratios = sorted(u / t for u, t in zip(seconds["untrimmed"], seconds["trimmed"]))
    return {
        "calls": len(calls),
        "texts": texts,
        "mean_padded_length": statistics.mean(call["input_ids"].shape[1] for call in calls),
        # layer 1 runs the padded grid either way; the untrimmed graph runs it at every layer
        "mean_trimmed_length_by_layer": [statistics.mean(column) for column in zip(*lengths)],
        "trimmed_ms_per_text": [1e3 * s / texts for s in seconds["trimmed"]],
        "untrimmed_ms_per_text": [1e3 * s / texts for s in seconds["untrimmed"]],
        "untrimmed_over_trimmed_median": statistics.median(ratios),
        "untrimmed_over_trimmed_range": [ratios[0], ratios[-1]],
        "same_exits": bool(torch.equal(runs["trimmed"][1], runs["untrimmed"][1])),
        "max_logit_difference": float((runs["trimmed"][0] - runs["untrimmed"][0]).abs().max()),
        "mean_layers": float(runs["trimmed"][1].float().mean()),
    }


def _lengths_read(graph_of, lengths: list[list[int]]):
    """``graph_of`` (the exit graph lookup) whose graph appends each call's grid lengths to ``lengths``."""

    class Read:
        def __init__(self, graph):
            self.graph, self.position_bias = graph, graph.position_bias

        def run(self, *args):
            result = self.graph.run(*args)
            lengths.append(result[2])
            return result

    def lookup(*args):
        graph = graph_of(*args)
        return None if graph is None else Read(graph)

    return lookup


def _texts(path: Path, count: int) -> list[str]:
    if path.suffix == ".csv":
        import pandas as pd

        return [str(text) for text in pd.read_csv(path)["text"].tolist()[:count]]
    return [line for line in path.read_text().splitlines() if line.strip()][:count]


def calls_in_order(tokenizer, texts: list[str], size: int, order: str) -> list[dict]:
    """``texts`` tokenized in calls of ``size`` rows: in their order (``"file"``) or sorted by token count, longest
    first (``"sorted"``), each call padded to its longest."""
    if order == "sorted":
        counts = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -counts[i])]
    return [
        dict(tokenizer(texts[start : start + size], padding=True, truncation=True, return_tensors="pt"))
        for start in range(0, len(texts), size)
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an eek fit folder fitted on the static int8 layers (--layers openvino-static)")
    parser.add_argument("--texts", type=Path, required=True, help="texts one a line, or a .csv with a text column")
    parser.add_argument("--count", type=int, default=600, help="the first N texts (default 600)")
    parser.add_argument("--size", type=int, default=32, help="rows a call (default 32)")
    parser.add_argument("--orders", nargs="+", choices=["sorted", "file"], default=["sorted", "file"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="a JSON file for the readings")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.count < 1 or args.rounds < 1 or args.size < 1:
        parser.error("--count, --size and --rounds must be >= 1")
    torch.set_num_threads(args.threads)

    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(args.folder, dtype="int8")
    if getattr(model, "eek_int8_recipe", None) != "static-ov":
        raise SystemExit(f"{args.folder} is not served on the static int8 layers: fit it with --layers openvino-static")
    from earlyexit_kernels.engine.layers.runtime_choice import graph_on

    graph_on(model)  # the graph is what this reads, whichever way eek fit chose on the CPU it fitted on
    texts = _texts(args.texts, args.count)
    orders = {}
    for order in args.orders:
        calls = calls_in_order(tokenizer, texts, args.size, order)
        untrimmed = untrimmed_graph(model, calls[0])
        orders[order] = reading = measure(model, untrimmed, calls, args.rounds)
        print(
            f"{order}: grid length by layer {[round(x, 1) for x in reading['mean_trimmed_length_by_layer']]} "
            f"trimmed; the untrimmed graph's time / the trimmed one's {reading['untrimmed_over_trimmed_median']:.3f}"
            f" ({reading['untrimmed_over_trimmed_range'][0]:.2f}-{reading['untrimmed_over_trimmed_range'][1]:.2f})",
            flush=True,
        )
    if args.output is not None:
        from benchmarks.suite.script_results import run_conditions, write_json

        record = {
            **run_conditions("benchmarks/micro/exit_graph_grid_trim.py", argv, started),
            "folder": Path(args.folder).name,
            "count": len(texts),
            "size": args.size,
            "rounds": args.rounds,
            "orders": orders,
        }
        write_json(args.output, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
