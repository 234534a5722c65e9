"""The exit graph against the layer-by-layer loop by call size: where the one OpenVINO call a batch earns its cost.

The early-exit forward on static int8 layers runs a call in one OpenVINO call
(:mod:`~earlyexit_kernels.engine.step.ov_exit_graph`) from
:data:`~earlyexit_kernels.engine.step.ov_exit_graph.GRAPH_MIN_POSITIONS` grid positions (rows x padded length), and
smaller calls layer by layer. This times both ways on the same calls: an ``eek fit`` folder fitted on the static
layers (``--layers openvino-static``), loaded as it is served (``--dtype int8``), its own policy; the texts in their
file's order (as requests arrive), cut into calls of each ``--sizes`` rows and tokenized before the timing. Per size,
one untimed pass each way (the graph forced on every call, whatever its size), then ``--rounds`` rounds alternating which runs first; the ratio (the loop's time / the
graph's, above 1 where the graph is faster) is paired within a round, its median and range reported, with the mean
padded positions a call::

    python benchmarks/micro/exit_graph_call_size.py FOLDER --texts rt-test.txt --count 128 --sizes 1 2 4 8 16 32 \\
        --rounds 8 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root


def measure(model, calls: list[dict], rounds: int) -> dict:
    """One size's reading: ``calls`` (the model's inputs) run by the graph (``step="auto"``, on every call whatever
    its size) and by the loop (``step="exact"``), ``rounds`` alternating rounds after one untimed pass each."""
    from earlyexit_kernels.engine.step import ov_exit_graph
    from earlyexit_kernels.patching.patch import policy_of

    policy = policy_of(model)
    kept = ov_exit_graph.GRAPH_MIN_POSITIONS
    ov_exit_graph.GRAPH_MIN_POSITIONS = 0  # the graph on every call: what the rule chooses between is timed
    try:
        return _timed(model, policy, calls, rounds)
    finally:
        ov_exit_graph.GRAPH_MIN_POSITIONS = kept


def _timed(model, policy, calls: list[dict], rounds: int) -> dict:
    import earlyexit_kernels as eek

    texts = sum(len(call["input_ids"]) for call in calls)
    seconds: dict[str, list[float]] = {"auto": [], "exact": []}
    exits = {}
    with torch.inference_mode():
        for step in seconds:
            eek.patch(model, policy, step=step)
            exits[step] = torch.cat([model(**call).exit_layer for call in calls])
        for round_ in range(rounds):
            for step in ("auto", "exact") if round_ % 2 == 0 else ("exact", "auto"):
                eek.patch(model, policy, step=step)
                start = time.perf_counter()
                for call in calls:
                    model(**call)
                seconds[step].append(time.perf_counter() - start)
        eek.patch(model, policy, step="auto")
    ratios = sorted(loop / graph for loop, graph in zip(seconds["exact"], seconds["auto"]))
    return {
        "calls": len(calls),
        "texts": texts,
        "mean_positions": statistics.mean(call["input_ids"].numel() for call in calls),
        "graph_ms_per_text": [1e3 * s / texts for s in seconds["auto"]],
        "loop_ms_per_text": [1e3 * s / texts for s in seconds["exact"]],
        "loop_over_graph_median": statistics.median(ratios),
        "loop_over_graph_range": [ratios[0], ratios[-1]],
        "same_exits": bool(torch.equal(exits["auto"], exits["exact"])),
        "mean_layers": float(exits["auto"].float().mean()),
    }


def _texts(path: Path, count: int) -> list[str]:
    if path.suffix == ".csv":
        import pandas as pd

        return [str(text) for text in pd.read_csv(path)["text"].tolist()[:count]]
    return [line for line in path.read_text().splitlines() if line.strip()][:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an eek fit folder fitted on the static int8 layers (--layers openvino-static)")
    parser.add_argument("--texts", type=Path, required=True, help="texts one a line, or a .csv with a text column")
    parser.add_argument("--count", type=int, default=128, help="the first N texts (default 128)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="rows a call")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="a JSON file for the readings")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.count < 1 or args.rounds < 1 or min(args.sizes) < 1:
        parser.error("--count, --rounds and every --sizes must be >= 1")
    torch.set_num_threads(args.threads)

    from earlyexit_kernels.engine.step.ov_exit_graph import GRAPH_MIN_POSITIONS
    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(args.folder, dtype="int8")
    if getattr(model, "eek_int8_recipe", None) != "static-ov":
        raise SystemExit(f"{args.folder} is not served on the static int8 layers: fit it with --layers openvino-static")
    from earlyexit_kernels.engine.layers.runtime_choice import graph_on

    graph_on(model)  # the graph is what this reads, whichever way eek fit chose on the CPU it fitted on
    texts = _texts(args.texts, args.count)
    sizes = {}
    for size in args.sizes:
        calls = [
            dict(tokenizer(texts[start : start + size], padding=True, truncation=True, return_tensors="pt"))
            for start in range(0, len(texts), size)
        ]
        sizes[str(size)] = reading = measure(model, calls, args.rounds)
        print(
            f"{size:>3} rows a call ({reading['mean_positions']:.0f} positions): the loop's time / the graph's "
            f"{reading['loop_over_graph_median']:.3f} ({reading['loop_over_graph_range'][0]:.2f}-"
            f"{reading['loop_over_graph_range'][1]:.2f})",
            flush=True,
        )
    if args.output is not None:
        from benchmarks.suite.script_results import run_conditions, write_json

        record = {
            **run_conditions("benchmarks/micro/exit_graph_call_size.py", argv, started),
            "folder": Path(args.folder).name,
            "count": len(texts),
            "rounds": args.rounds,
            "graph_min_positions": GRAPH_MIN_POSITIONS,
            "sizes": sizes,
        }
        write_json(args.output, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
