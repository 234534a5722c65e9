"""One encoder layer's time at each row count, the bucket sizes it chooses, and what each bucket plan costs.

On a GPU (issue 93): BERT-base's shape (12 layers, hidden 768, 12 heads, FFN 3072, random weights
from a transformers config), bf16, S = 128, every row count 1..256. Each count's layer is captured
in a CUDA graph and timed by CUDA events around 20 replays, 15 rounds with every count in each
(``earlyexit_kernels/bench/layer_costs.py``): the table, with each count's median and interquartile
range. From it, the bucket sizes the table chooses (``engine/graphed/buckets.py``'s ``sizes_from_table``: a
size kept only where the layer is faster than at the next larger kept size by more than the noise)
and, for ``geometric-p0.10`` and ``sched-f0.50`` (every row exits after layer 6) at B = 64 and 256,
what the graphed step runs with vLLM's sizes and with the chosen ones, the count read a layer late
(a threshold policy's plan; ``bench/bucket_plans.py``): row-layers run against needed, the layers'
predicted time against the ideal at the exact counts, and the speed-up over the full model's layers.
Only the encoder layers are counted: the exit step, the gather and their launches come on top.

    python benchmarks/micro/layer_cost_table.py --output-dir OUT          # a GPU: writes OUT/layer_costs.json and .md

``--rehearse``: the same run on the CPU with the suite's tiny model (4 layers, hidden 32), float32,
S = 16, B = 8 and 16, 3 rounds of 2 calls: it times nothing worth keeping, it checks the script runs.
``--rows buckets``: only vLLM's sizes and every multiple of 8 (the ideal, which needs every exact
count, is then left blank). The JSON is the table (``LayerCostTable``), which
``earlyexit_kernels.engine.graphed.buckets.sizes_from_file`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from earlyexit_kernels.bench.bucket_plans import plan_cost
from earlyexit_kernels.bench.layer_costs import REPEATS, REPLAYS, measure_layer_costs
from earlyexit_kernels.bench.models import SIZES, build_model
from earlyexit_kernels.bench.pattern_names import describe_pattern
from earlyexit_kernels.bench.patterns import pattern_by_name
from earlyexit_kernels.engine.graphed.buckets import DEFAULT_SIZES, sizes_from_table
from earlyexit_kernels.models import adapter_class

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATTERNS = ("geometric-p0.10", "sched-f0.50")
LAG = 1  # the graphed step's lag on a GPU for a policy whose counts come from the device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where layer_costs.json and .md go")
    parser.add_argument("--rehearse", action="store_true", help="the CPU, the tiny model, B = 8 and 16")
    parser.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 rehearsing)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default base (tiny rehearsing)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (16 rehearsing)")
    parser.add_argument("--batches", default=None, help="comma-separated B; default 64,256 (8,16 rehearsing)")
    parser.add_argument("--rows", choices=("all", "buckets"), default="all", help="every count 1..max B, or fewer")
    parser.add_argument("--repeats", type=int, default=None, help=f"rounds; default {REPEATS} (3 rehearsing)")
    parser.add_argument("--replays", type=int, default=None, help=f"calls a round; default {REPLAYS} (2 rehearsing)")
    args = parser.parse_args(argv)
    rehearse = args.rehearse
    args.device = torch.device(args.device or ("cpu" if rehearse or not torch.cuda.is_available() else "cuda"))
    args.dtype = args.dtype or ("fp32" if rehearse else "bf16")
    args.size = args.size or ("tiny" if rehearse else "base")
    args.seq_len = args.seq_len or (16 if rehearse else 128)
    args.batches = [int(b) for b in (args.batches or ("8,16" if rehearse else "64,256")).split(",")]
    args.repeats = args.repeats or (3 if rehearse else REPEATS)
    args.replays = args.replays or (2 if rehearse else REPLAYS)
    return args


def row_counts(kind: str, largest: int) -> list[int]:
    if kind == "all":
        return list(range(1, largest + 1))
    return sorted({n for n in DEFAULT_SIZES if n <= largest} | set(range(8, largest + 1, 8)) | {largest})


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def simulated_rows(table, num_layers: int, batches: list[int], seq_len: int, plans: dict) -> list[str]:
    """The Markdown rows of each pattern, B and plan: what the graphed step runs and costs."""
    lines = []
    for batch in batches:
        for name in PATTERNS:
            exits = pattern_by_name(name, batch, num_layers, seq_len).exit_layers
            for label, sizes in plans.items():
                try:
                    cost = plan_cost(exits, num_layers, table.seconds, sizes=sizes, lag=LAG)
                except KeyError:  # a count the table did not time (--rows buckets): rows only
                    cost = plan_cost(exits, num_layers, sizes=sizes, lag=LAG)
                ideal_speedup = None if cost.ideal_seconds is None else cost.full_seconds / cost.ideal_seconds
                lines.append(
                    f"| {batch} | {name}: {describe_pattern(name, num_layers, batch)} | {label} | "
                    f"{' '.join(map(str, cost.buckets))} | {cost.row_layers_run} / {cost.row_layers_needed} "
                    f"({cost.row_fraction:.3f}) | {_ms(cost.seconds)} | {_ms(cost.ideal_seconds)} | "
                    f"{_ratio(cost.time_fraction)} | {_ratio(cost.speedup)} ({_ratio(ideal_speedup)}) |"
                )
    return lines


def markdown(table, chosen: tuple[int, ...], args, num_layers: int, seconds: float, command: str) -> str:
    largest = max(table.rows)
    default = tuple(n for n in DEFAULT_SIZES if n <= largest)
    how = (
        "each count's layer captured in a CUDA graph, timed by CUDA events"
        if table.captured
        else "eager calls timed by the host's clock"
    )
    lines = [
        f"# One encoder layer by row count: {table.device}",
        "",
        f"{table.model}, hidden {table.hidden_size}, {table.dtype}, S = {table.seq_len}, rows "
        f"{min(table.rows)}..{largest} ({len(table.rows)} counts); {how}; median and interquartile range of "
        f"{table.repeats} rounds of {table.replays} calls; torch {table.torch}. Measured in {seconds:.1f} s by "
        f"`{command}`.",
        "",
        f"Sizes chosen from the table (`sizes_from_table`): {', '.join(map(str, chosen))} ({len(chosen)} sizes; "
        f"vLLM's up to {largest}: {len(default)}).",
        "",
        f"What the graphed step runs with each plan, the count read {LAG} layer late (a threshold policy's plan); "
        "layer time only (the exit step, the gather and their launches come on top):",
        "",
        "| B | pattern | sizes | bucket by layer | row-layers run / needed | layers, ms | ideal, ms | "
        "of ideal | speed-up over the full layers (ideal) |",
        "|---|---|---|---|---|---|---|---|---|",
        *simulated_rows(table, num_layers, args.batches, args.seq_len, {"vLLM's": DEFAULT_SIZES, "chosen": chosen}),
        "",
        "The layer at vLLM's sizes and the chosen ones:",
        "",
        "| rows | median, µs | interquartile range, µs | vLLM's | chosen |",
        "|---|---|---|---|---|",
    ]
    for n in sorted(set(default) | set(chosen)):
        lines.append(
            f"| {n} | {table.seconds[n] * 1e6:.1f} | {table.spread[n] * 1e6:.1f} | "
            f"{'yes' if n in default else ''} | {'yes' if n in chosen else ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    command = "python benchmarks/micro/layer_cost_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    size = SIZES[args.size]
    model = build_model(
        "bert", size, args.seq_len, device=str(args.device), dtype=DTYPES[args.dtype], attn="sdpa", seed=0
    )
    adapter = adapter_class(model)(model, None)
    rows = row_counts(args.rows, max(args.batches))
    print(f"timing {len(rows)} row counts on {args.device} ...", file=sys.stderr, flush=True)
    table = measure_layer_costs(
        adapter,
        rows,
        args.seq_len,
        device=args.device,
        dtype=DTYPES[args.dtype],
        repeats=args.repeats,
        replays=args.replays,
    )
    if args.device.type == "cuda" and not table.captured:
        print("warning: a layer could not be captured; the table's times are eager calls", file=sys.stderr)
    chosen = sizes_from_table(table)
    seconds = time.perf_counter() - started
    notes = dict(command=command, seconds=round(seconds, 1), sizes_chosen=list(chosen))
    table = dataclasses.replace(table, model=f"{table.model} ({size.label})", notes=notes)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table.save(args.output_dir / "layer_costs.json")
    text = markdown(table, chosen, args, size.layers, seconds, command)
    (args.output_dir / "layer_costs.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
