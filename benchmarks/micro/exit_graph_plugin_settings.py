"""The exit graph compiled with OpenVINO's fused-subgraph code generation off against its default compilation.

The exit graph (:mod:`~earlyexit_kernels.engine.step.ov_exit_graph`) is compiled with the static layers' settings
(:func:`~earlyexit_kernels.engine.layers.ov_layer.compile_config`). The stack benchmark's OpenVINO peer is compiled
at the faster of the plugin's default and ``SNIPPETS_MODE=DISABLE`` (its code generation for fused subgraphs off),
timed on the machine. This compiles the model's own exit graph both ways and times them on the same calls: an ``eek
fit`` folder fitted on the static layers (``--layers openvino-static``), loaded as it is served (``--dtype int8``),
its own policy or ``--full-depth``; ``--count`` texts in calls of ``--size`` rows, sorted by token count (longest
first) or in the file's order. Calls under the graph's size rule run the layer-by-layer loop either way, as served.
Per order, one untimed pass each way, then ``--rounds`` rounds alternating which runs first; the ratio (the
default's time / the other's, above 1 where the setting pays) is paired within a round::

    python benchmarks/micro/exit_graph_plugin_settings.py FOLDER --texts rt-test.txt --count 600 --size 32 \\
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the grid-trim benchmark's readers of texts and calls

from exit_graph_grid_trim import _texts, calls_in_order  # noqa: E402

#: the plugin's options the other compilation adds over the graph's own
SETTINGS = {"SNIPPETS_MODE": "DISABLE"}


def recompiled(model, call: dict, settings: dict):
    """A copy of ``model``'s exit graph (one ``call`` run first, to build it) compiled with ``settings`` over the
    graph's own options, for torch's thread count now, as ``eek fit`` times it; the model's own graph is left as it
    is."""
    from earlyexit_kernels.engine.step import ov_exit_graph

    seen = []  # the graphs built
    original = ov_exit_graph.exit_graph

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    ov_exit_graph.exit_graph = spy
    try:
        with torch.inference_mode():
            model(**call)
    finally:
        ov_exit_graph.exit_graph = original
    if not seen or seen[0] is None:
        raise SystemExit("the forward did not reach the exit graph: is the folder on the static int8 layers?")
    other = seen[0].with_settings(tuple(settings.items()))  # the same converted model, its own compilation
    other.compiled()
    return other


def measure(model, other, calls: list[dict], rounds: int) -> dict:
    """``calls`` through the model's own graph and through ``other`` (:func:`recompiled`), ``rounds`` alternating
    rounds after one untimed pass each."""
    from earlyexit_kernels.engine.step import ov_exit_graph

    original = ov_exit_graph.exit_graph
    lookups = {"default": original, "settings": lambda *args: other}
    seconds: dict[str, list[float]] = {name: [] for name in lookups}
    exits = {}
    try:
        with torch.inference_mode():
            for name, lookup in lookups.items():
                ov_exit_graph.exit_graph = lookup
                exits[name] = torch.cat([model(**call).exit_layer for call in calls])
            for round_ in range(rounds):
                for name in ("default", "settings") if round_ % 2 == 0 else ("settings", "default"):
                    ov_exit_graph.exit_graph = lookups[name]
                    start = time.perf_counter()
                    for call in calls:
                        model(**call)
                    seconds[name].append(time.perf_counter() - start)
    finally:
        ov_exit_graph.exit_graph = original
    texts = sum(len(call["input_ids"]) for call in calls)
    ratios = sorted(d / s for d, s in zip(seconds["default"], seconds["settings"]))
    return {
        "calls": len(calls),
        "graph_calls": sum(c["input_ids"].numel() >= ov_exit_graph.GRAPH_MIN_POSITIONS for c in calls),
        "texts": texts,
        "default_ms_per_text": [1e3 * s / texts for s in seconds["default"]],
        "settings_ms_per_text": [1e3 * s / texts for s in seconds["settings"]],
        "default_over_settings_median": statistics.median(ratios),
        "default_over_settings_range": [ratios[0], ratios[-1]],
        "same_exits": bool(torch.equal(exits["default"], exits["settings"])),
        "mean_layers": float(exits["default"].float().mean()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an eek fit folder fitted on the static int8 layers (--layers openvino-static)")
    parser.add_argument("--texts", type=Path, required=True, help="texts one a line, or a .csv with a text column")
    parser.add_argument("--count", type=int, default=600, help="the first N texts (default 600)")
    parser.add_argument("--size", type=int, default=32, help="rows a call (default 32)")
    parser.add_argument("--orders", nargs="+", choices=["sorted", "file"], default=["sorted", "file"])
    parser.add_argument("--full-depth", action="store_true", help="every row runs every layer (no early exit)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="a JSON file for the readings")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.count < 1 or args.rounds < 1 or args.size < 1:
        parser.error("--count, --size and --rounds must be >= 1")
    torch.set_num_threads(args.threads)

    import earlyexit_kernels as eek
    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(args.folder, dtype="int8")
    if getattr(model, "eek_int8_recipe", None) != "static-ov":
        raise SystemExit(f"{args.folder} is not served on the static int8 layers: fit it with --layers openvino-static")
    from earlyexit_kernels.engine.layers.runtime_choice import graph_on

    graph_on(model)  # the graph is what this reads, whichever way eek fit chose on the CPU it fitted on
    if args.full_depth:
        eek.patch(model, eek.Entropy(0.0))  # an entropy never below 0: every row runs every layer
    texts = _texts(args.texts, args.count)
    orders = {}
    for order in args.orders:
        calls = calls_in_order(tokenizer, texts, args.size, order)
        other = recompiled(model, calls[0], SETTINGS)
        orders[order] = reading = measure(model, other, calls, args.rounds)
        print(
            f"{order}: the default compilation's time / {SETTINGS}'s {reading['default_over_settings_median']:.3f} "
            f"({reading['default_over_settings_range'][0]:.2f}-{reading['default_over_settings_range'][1]:.2f}), "
            f"{reading['graph_calls']} of {reading['calls']} calls on the graph",
            flush=True,
        )
    if args.output is not None:
        from benchmarks.suite.script_results import run_conditions, write_json

        record = {
            **run_conditions("benchmarks/micro/exit_graph_plugin_settings.py", argv, started),
            "folder": Path(args.folder).name,
            "count": len(texts),
            "size": args.size,
            "rounds": args.rounds,
            "full_depth": args.full_depth,
            "settings": SETTINGS,
            "orders": orders,
        }
        write_json(args.output, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
