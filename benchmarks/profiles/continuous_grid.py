"""``eek.classify`` against the simple paths, on a grid of streams, models, exit rates and threads (issue 26).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/profiles/continuous_grid.py --part tiny
    .venv/bin/python benchmarks/profiles/continuous_grid.py --report      # the table again, from every part's CSV

Each ``--part`` writes ``benchmarks/results/intel_xeon/continuous_grid/<part>-t<threads>.csv`` (one row per cell, the
command in its ``command`` column); ``--report`` (and every part) rewrites ``README.md`` beside
them from all the parts' CSVs.

**The workload** is the stream benchmark's (:mod:`earlyexit_kernels.bench.stream`): token lengths
log-normal, median 28, a tail to 256, random BERT (``initializer_range`` 0.1, 12 layers) whose
exit heads are set so that exits spread over the layers, ``Entropy(t)`` calibrated so that a
chosen share of the layer evaluations is saved (0: nothing exits). ``max_batch_size`` 32.

**The methods**, same sequences, same weights, token ids ready (no tokenizer in the timings),
interleaved repetitions (the order rotates), median seconds:

- ``unpatched``: the unpatched model on length-sorted batches of 32 (the whole stream sorted,
  tensors ready);
- ``per_batch``: the patched model (per-batch early exit) on the same batches;
- ``classify``: ``eek.classify(model, items, max_batch_size=32)`` on dicts of ``input_ids`` in
  stream order (building its tensors is in its time).

**The columns**: ``classify / per_batch`` (target >= 1.0), ``classify / unpatched`` when nothing
exits (target >= 0.97), and ``classify of ideal`` when half the layers are saved (target >= 0.9):
the ideal is ``unpatched``'s time per real token-layer times the tokens x exit layers the
stream needs. ``token_fill``: real tokens over the slots (rows x padded length) the engine's
layer calls held (a packed call computes its token-wise parts on the real tokens only);
``calls``: its layer calls, of which ``packed`` ran packed (``per_batch``'s calls beside them).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.stream_grid import sorted_stream
from earlyexit_kernels.bench.results import device_folder
from earlyexit_kernels.bench.stream import (
    StreamConfig,
    calibrate,
    recorded_engines,
    run_on_batches,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / device_folder() / "continuous_grid"
BATCH = 32

COLUMNS = [
    "part",
    "model",
    "sequences",
    "tokens",
    "threads",
    "target_saved",
    "saved_layer_share",
    "exited_early",
    "unpatched_seq_s",
    "per_batch_seq_s",
    "classify_seq_s",
    "classify_vs_per_batch",
    "classify_vs_unpatched",
    "classify_of_ideal",
    "token_fill",
    "classify_calls",
    "packed_calls",
    "per_batch_calls",
    "exit_mismatches",
    "repeats",
    "command",
]


@dataclass(frozen=True)
class Cell:
    hidden: int
    sequences: int
    saved: tuple[float, ...]  # shares of layer evaluations saved, each its own row


# The grid, by part: each part is one invocation (under ~8 minutes on the 2-core CPU).
PARTS = {
    "tiny": [Cell(128, 32, (0.0, 0.5)), Cell(128, 128, (0.0, 0.5)), Cell(128, 1024, (0.0, 0.5))],
    "long": [Cell(128, 16384, (0.0, 0.5))],
    "real": [Cell(384, 32, (0.0, 0.5)), Cell(384, 128, (0.0, 0.5)), Cell(768, 32, (0.0, 0.5))],
    "smoke": [Cell(32, 40, (0.0, 0.5))],  # seconds: for a quick look, not part of the report
}


def _median_time(fn, samples: list[float]) -> None:
    began = time.perf_counter()
    result = fn()
    samples.append(time.perf_counter() - began)
    return result


def measure(cell: Cell, threads: list[int], repeats: int, layers: int = 12, progress=print) -> list[dict]:
    """Rows of one cell: one per (threads, saved)."""
    config = StreamConfig(
        sequences=cell.sequences, hidden=cell.hidden, layers=layers, heads=max(2, cell.hidden // 64), seed=0
    )
    stream = sorted_stream(config, BATCH)
    ids, batches, items, entropies = stream.ids, stream.batches, stream.items, stream.entropies
    unpatched, model = stream.unpatched, stream.model
    tokens = torch.tensor([len(i) for i in ids])
    total_tokens = int(tokens.sum())
    label = f"BERT H{cell.hidden} L{layers}"
    out = []
    stats: list = []  # the engines' counts of the last eek.classify pass
    threads_before = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for saved in cell.saved:
                threshold = calibrate(entropies, saved)
                eek.patch(model, eek.Entropy(threshold))

                def run_unpatched():
                    return run_on_batches(unpatched, batches)

                def run_per_batch():
                    return run_on_batches(model, batches)

                def run_classify():
                    with recorded_engines() as made:
                        result = list(eek.classify(model, items, max_batch_size=BATCH))
                    stats[:] = [engine.stats for engine in made]
                    return result

                # The unpatched model is timed in every row, interleaved with the two others: this VM's
                # speed drifts by several percent over minutes, so only passes of one window compare.
                methods = {"unpatched": run_unpatched, "per_batch": run_per_batch, "classify": run_classify}
                warm = items[: 2 * BATCH]
                with torch.no_grad():  # first-call costs (thread pools, allocator) are no method's
                    for _, i, m in batches[:2]:
                        unpatched(input_ids=i, attention_mask=m)
                        model(input_ids=i, attention_mask=m)
                list(eek.classify(model, warm, max_batch_size=BATCH))
                times: dict[str, list[float]] = {name: [] for name in methods}
                results = {}
                keys = list(methods)
                for repeat in range(repeats):
                    turn = repeat % len(keys)
                    for key in keys[turn:] + keys[:turn]:
                        results[key] = _median_time(methods[key], times[key])
                seconds = {key: statistics.median(v) for key, v in times.items()}

                exits = torch.zeros(len(ids), dtype=torch.long)
                per_batch_calls = 0
                for (positions, _, _), result in zip(batches, results["per_batch"]):
                    exits[positions] = result.exit_layer
                    per_batch_calls += sum(int((result.exit_layer >= layer).any()) for layer in range(1, layers + 1))
                classify_exits = torch.tensor([p.exit_layer for p in results["classify"]])
                mean_exit = exits.float().mean().item()
                ideal = seconds["unpatched"] / (total_tokens * layers) * int((tokens * exits).sum())
                row = {
                    "part": "",
                    "model": label,
                    "sequences": len(ids),
                    "tokens": total_tokens,
                    "threads": count,
                    "target_saved": saved,
                    "saved_layer_share": round(1 - mean_exit / layers, 3),
                    "exited_early": round(float((exits < layers).float().mean()), 3),
                    "unpatched_seq_s": round(len(ids) / seconds["unpatched"], 1),
                    "per_batch_seq_s": round(len(ids) / seconds["per_batch"], 1),
                    "classify_seq_s": round(len(ids) / seconds["classify"], 1),
                    "classify_vs_per_batch": round(seconds["per_batch"] / seconds["classify"], 3),
                    "classify_vs_unpatched": round(seconds["unpatched"] / seconds["classify"], 3),
                    "classify_of_ideal": round(ideal / seconds["classify"], 3),
                    "token_fill": round(sum(s.tokens for s in stats) / sum(s.slots for s in stats), 3),
                    "classify_calls": sum(s.calls for s in stats),
                    "packed_calls": sum(s.packed_calls for s in stats),
                    "per_batch_calls": per_batch_calls,
                    "exit_mismatches": int((classify_exits != exits).sum()),
                    "repeats": repeats,
                }
                out.append(row)
                progress(
                    f"{label} n={len(ids)} threads={count} saved={row['saved_layer_share']}: "
                    f"classify {row['classify_seq_s']}/s, x{row['classify_vs_per_batch']} per-batch, "
                    f"x{row['classify_vs_unpatched']} unpatched, {row['classify_of_ideal']} of ideal, "
                    f"token fill {row['token_fill']}, calls {row['classify_calls']} vs {row['per_batch_calls']}"
                )
    finally:
        torch.set_num_threads(threads_before)
    return out


# ---------------------------------------------------------------------------- report


def _read_parts(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.csv")):
        with open(path) as file:
            rows += list(csv.DictReader(file))
    return rows


def markdown(rows: list[dict]) -> str:
    """The grid's table and the targets met or missed, from the parts' rows."""
    lines = [
        "# `eek.classify` against the per-batch loop and plain sorted batching",
        "",
        "Written by `benchmarks/profiles/continuous_grid.py` (its docstring says what each column is). "
        "2-core CPU, no GPU, every part under an exclusive lock (no other test or benchmark running). "
        "`max_batch_size` 32; sequences/s are medians of interleaved repetitions.",
        "",
        "| model | sequences | threads | layers saved | exited early | unpatched /s | per-batch /s | classify /s "
        "| vs per-batch | vs unpatched | of ideal | token fill | calls (packed; per-batch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    met, missed = [], []
    for r in rows:
        saved = float(r["target_saved"])
        vs_unpatched = r["classify_vs_unpatched"] if saved == 0 else "-"
        of_ideal = r["classify_of_ideal"] if saved > 0 else "-"
        lines.append(
            f"| {r['model']} | {r['sequences']} | {r['threads']} | {float(r['saved_layer_share']):.0%} "
            f"| {float(r['exited_early']):.0%} | {r['unpatched_seq_s']} | {r['per_batch_seq_s']} "
            f"| {r['classify_seq_s']} | {r['classify_vs_per_batch']}x | {vs_unpatched} | {of_ideal} "
            f"| {float(r['token_fill']):.1%} | {r['classify_calls']} ({r.get('packed_calls', '-')}; {r['per_batch_calls']}) |"
        )
        cell = f"{r['model']} n={r['sequences']} t={r['threads']} saved={float(r['saved_layer_share']):.0%}"
        checks = [("vs per-batch", float(r["classify_vs_per_batch"]), 1.0)]
        if saved == 0:
            checks.append(("vs unpatched", float(r["classify_vs_unpatched"]), 0.97))
        else:
            checks.append(("of ideal", float(r["classify_of_ideal"]), 0.9))
        for name, value, target in checks:
            (met if value >= target else missed).append(f"{cell}: {name} {value} (target {target})")
    lines += [
        "",
        f"Targets: {len(met)} of {len(met) + len(missed)} checks met "
        "(classify >= 1.0x per-batch everywhere, >= 0.97x unpatched when nothing exits, "
        ">= 0.9 of the ideal when layers are saved).",
    ]
    if missed:
        lines += ["", "Missed:", ""] + [f"- {m}" for m in missed]
    mismatched = [r for r in rows if int(r["exit_mismatches"])]
    lines += [
        "",
        "Exit layers of `eek.classify` against the per-batch loop: "
        + ("equal on every cell." if not mismatched else f"differ on {len(mismatched)} cells."),
        "",
        "Commands (one per part, each under `flock -x /tmp/eek-cpu.lock`):",
        "",
    ]
    for command in dict.fromkeys(r["command"] for r in rows):
        lines.append(f"- `{command}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=sorted(PARTS), help="which cells to run")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="rewrite README.md from the parts' CSVs and stop")
    args = parser.parse_args(argv)
    if not args.report:
        if args.part is None:
            parser.error("--part is needed (or --report)")
        command = "python benchmarks/profiles/continuous_grid.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        threads = [int(t) for t in args.threads.split(",")]
        began = time.perf_counter()
        rows = []
        for cell in PARTS[args.part]:
            rows += measure(cell, threads, args.repeats)
        command += f"  ({time.perf_counter() - began:.0f} s)"
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / f"{args.part}-t{'-'.join(map(str, threads))}.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({**row, "part": args.part, "command": command} for row in rows)
    text = markdown([r for r in _read_parts(args.out) if r["part"] != "smoke"])
    (args.out / "README.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
