"""The exit graph on shapes it has not met, and again once met: what its grid's padding (rows, length) buys.

OpenVINO's CPU plugin prepares every operation again for each input shape it has not met (shape inference, its
kernels made for the new sizes) and keeps what it made, keyed by shape. Inside the exit graph
(:mod:`~earlyexit_kernels.engine.step.ov_exit_graph`) each later layer runs the rows going on, on the positions they
need: a shape that served traffic (requests in arrival order) almost never repeats, unless the rows and the length
are padded to steps. Repeated passes over the same batches (the stack benchmark's) meet every shape again and hide
that cost. This times the graph of an ``eek fit`` folder on the static layers (loaded as served, ``--dtype int8``, its
own policy and plugin settings) built at each ``--steps`` (``LENGTH:ROWS``: the grid's length padded to multiples of
LENGTH, each later layer's rows to multiples of ROWS with rows that have left; ``8:8`` is the shipped graph), each its
own compiled model, on the texts of ``--texts`` in their file's order in calls of ``--batch``:

- the first pass, every call's shapes new to that compiled model (the graphs one after the other, each warmed on
  one call of a few rows first: its compilation is not timed);
- then ``--rounds`` passes in alternating order, the shapes met.

Per configuration: both, and whether every row's exit layer equals the shipped graph's::

    python benchmarks/micro/exit_graph_fresh_shapes.py FOLDER --texts .cache/demo/test.csv --count 1280 \\
        --rounds 4 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.corpus_peers import read_texts
from benchmarks.suite.script_results import run_conditions, write_json


def graph_with(model, steps: tuple[int, int]):
    """``model``'s exit graph (its policy's kind, its layers' plugin settings) built with ``steps`` (length, rows),
    compiled for torch's thread count now: its own compiled model, so its own prepared shapes."""
    from earlyexit_kernels.engine.step import ov_exit_graph
    from earlyexit_kernels.patching.patch import current_adapter, policy_of

    adapter, policy = current_adapter(model), policy_of(model)
    length_step, row_step = steps
    graph = ov_exit_graph.ExitGraph(
        model, adapter, model.early_exit_heads, policy, length_step=length_step, row_step=row_step
    )
    graph.compiled()
    return graph


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an eek fit folder on the static int8 layers")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column, or a .txt")
    parser.add_argument("--count", type=int, default=1280, help="how many texts (default 1280)")
    parser.add_argument("--batch", type=int, default=32, help="texts a call (default 32)")
    parser.add_argument("--rounds", type=int, default=4, help="passes once the shapes are met (default 4)")
    parser.add_argument("--steps", nargs="+", default=["8:8", "8:1", "1:1"], help="LENGTH:ROWS (default 8:8 8:1 1:1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        steps = [tuple(int(part) for part in step.split(":")) for step in args.steps]
    except ValueError:
        parser.error("--steps are LENGTH:ROWS, e.g. 8:8")
    if any(len(step) != 2 or min(step) < 1 for step in steps) or args.rounds < 1 or args.batch < 1:
        parser.error("--steps are two positive integers, --rounds and --batch at least 1")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    from earlyexit_kernels.integrations.model_folder import load_model
    from earlyexit_kernels.patching.patch import current_adapter, policy_of

    model, tokenizer = load_model(str(args.folder), dtype="int8")[:2]
    from earlyexit_kernels.engine.layers.runtime_choice import graph_on

    graph_on(model)  # the graph is what this reads, whichever way eek fit chose on the CPU it fitted on
    adapter, policy = current_adapter(model), policy_of(model)
    texts = read_texts(args.texts)[: args.count]
    calls = []
    with torch.inference_mode():
        for start in range(0, len(texts), args.batch):
            batch = tokenizer(texts[start : start + args.batch], padding=True, truncation=True, return_tensors="pt")
            mask = batch["attention_mask"]
            calls.append((adapter.embed(batch["input_ids"], batch.get("token_type_ids"), None, None, mask), mask))
    names = [f"{length}:{rows}" for length, rows in steps]
    graphs = {name: graph_with(model, step) for name, step in zip(names, steps, strict=True)}

    def one_pass(graph) -> tuple[float, torch.Tensor]:
        begin = time.perf_counter()
        exits = [graph.run(hidden, mask, policy)[1] for hidden, mask in calls]
        return time.perf_counter() - begin, torch.cat(exits)

    first, exits, seconds = {}, {}, {name: [] for name in names}
    with torch.inference_mode():
        for name, graph in graphs.items():
            hidden, mask = calls[0]
            graph.run(hidden[:2], mask[:2], policy)  # the compiled model's first call apart (not a text's shape)
            first[name], exits[name] = one_pass(graph)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 else reversed(names):
                seconds[name].append(one_pass(graphs[name])[0])
    shipped = names[0]
    results = {
        name: {
            "first_pass_ms": round(first[name] * 1e3, 1),
            "met_pass_ms": [round(s * 1e3, 1) for s in seconds[name]],
            "met_pass_ms_median": round(statistics.median(seconds[name]) * 1e3, 1),
            "first_over_met": round(first[name] / statistics.median(seconds[name]), 3),
            "exit_layers_equal_to_" + shipped: bool(torch.equal(exits[name], exits[shipped])),
        }
        for name in names
    }
    write_json(
        args.output,
        {
            **run_conditions("benchmarks/micro/exit_graph_fresh_shapes.py", argv, started),
            "what": "the exit graph at each padding (LENGTH:ROWS) on calls whose shapes it has not met (the first pass) "
            "and on the same calls again (median of the rounds), ms a pass",
            "folder": str(args.folder),
            "policy": repr(policy),
            "texts": len(texts),
            "calls": len(calls),
            "batch": args.batch,
            "rounds": args.rounds,
            "results": results,
        },
    )
    for name, result in results.items():
        print(
            f"{name}: first pass {result['first_pass_ms']:.0f} ms, met {result['met_pass_ms_median']:.0f} ms "
            f"({result['first_over_met']:.2f}x); exits as {shipped}'s: {result['exit_layers_equal_to_' + shipped]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
