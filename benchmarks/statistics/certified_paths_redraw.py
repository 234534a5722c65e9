"""Does the certificate hold along the path chosen on validation rows? Re-draws on the real task (issue 52).

The pool is ``benchmarks/statistics/certified_budget_redraw.py``'s: ``make demo``'s MiniLM-L6 fine-tuned on
Rotten Tomatoes with mean-pooled MLP exit heads trained on the train split (heads only), its
validation and test splits (4,000 rows no training step saw) recorded once. Each draw then takes, with replacement from the pool, path
rows (what ``eek fit``'s validation rows do: choose the path, build the per-layer one) and
calibration rows, and runs :func:`~earlyexit_kernels.calibration.certify.certify` with
both (``path_record=``), as ``eek fit`` does. The certified policy's risk is measured on the
whole pool (the population the rows were drawn from: what the guarantee states). A violation is
a risk over the budget; its rate must stay at or below ``1 - confidence`` for every path chosen.
The uncertified point of the same path on the same calibration rows is counted beside it.

    .venv/bin/python benchmarks/statistics/certified_paths_redraw.py --output benchmarks/results/certified_paths_redraw_cpu.json \\
        --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from certified_budget_redraw import pool_record  # the same heads on the same pool (this folder is on sys.path)

from earlyexit_kernels.bench.script_results import run_conditions, write_json, write_section
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.losses import row_losses
from earlyexit_kernels.calibration.record import replay

START, END = "<!-- certified-paths-redraw:start -->", "<!-- certified-paths-redraw:end -->"
RISKS = ("agreement", "accuracy")


def simulate(record, *, budget: float, confidence: float, calibration_rows: int, path_rows: int, draws: int, seed):
    rows = record.all_logits.shape[1]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for risk in RISKS:
        tally = {"draws": 0, "certified_over": 0, "uncertified_over": 0, "layers": 0.0, "paths": {}}
        for _ in range(draws):
            calibration = record.subset(torch.randint(0, rows, (calibration_rows,), generator=generator))
            path = record.subset(torch.randint(0, rows, (path_rows,), generator=generator))
            chosen, certificate, curve = certify(calibration, budget, confidence, target=risk, path_record=path)
            pool_risk = float(row_losses(replay(chosen.policy, record).logits, record, risk).mean())
            within = [
                p
                for p in curve
                if float(row_losses(replay(p.policy, calibration).logits, calibration, risk).mean()) <= budget + 1e-12
            ]
            cheapest = min(within, key=lambda p: p.mean_layers) if within else curve[0]
            uncertified_risk = float(row_losses(replay(cheapest.policy, record).logits, record, risk).mean())
            tally["draws"] += 1
            tally["certified_over"] += pool_risk > budget + 1e-12
            tally["uncertified_over"] += uncertified_risk > budget + 1e-12
            tally["layers"] += replay(chosen.policy, record).layers_run.float().mean().item()
            tally["paths"][certificate.path] = tally["paths"].get(certificate.path, 0) + 1
        n = tally["draws"]
        out.append(
            {
                "risk": risk,
                "budget": budget,
                "confidence": confidence,
                "calibration_rows": calibration_rows,
                "path_rows": path_rows,
                "draws": n,
                "certified_rate": tally["certified_over"] / n,
                "uncertified_rate": tally["uncertified_over"] / n,
                "certified_layers": tally["layers"] / n,
                "paths": tally["paths"],
            }
        )
    return out


def render(results: dict) -> str:
    lines = [
        START,
        f"Measured {results['date']} on {results['cpu']} ({results['command']}, {results['seconds']:.0f} s): "
        f"{results['pool_rows']:,} pool rows, each draw {results['rows'][0]['path_rows']:,} path rows and "
        f"{results['rows'][0]['calibration_rows']:,} calibration rows drawn with replacement; the risk of the "
        "chosen policy measured on the whole pool.",
        "",
        "| risk | budget | confidence | draws | paths chosen | certified: violation rate | certified mean layers "
        "| uncertified: violation rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        paths = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(r["paths"].items()))
        lines.append(
            f"| {r['risk']} | {100 * r['budget']:g} point | {100 * r['confidence']:g}% | {r['draws']} | {paths} | "
            f"{100 * r['certified_rate']:.1f}% | {r['certified_layers']:.2f} | {100 * r['uncertified_rate']:.1f}% |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--calibration-rows", type=int, default=2000)
    parser.add_argument("--path-rows", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--from-json", type=Path)
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        started = time.perf_counter()
        record, _ = pool_record(args.seed)
        rows = simulate(
            record,
            budget=0.01,
            confidence=0.95,
            calibration_rows=args.calibration_rows,
            path_rows=args.path_rows,
            draws=args.draws,
            seed=args.seed,
        )
        results = {
            **run_conditions("benchmarks/statistics/certified_paths_redraw.py", argv, started),
            "pool_rows": record.all_logits.shape[1],
            "rows": rows,
        }
        if args.output:
            write_json(args.output, results)
    print(render(results))
    if args.readme:
        write_section(args.readme, START, END, render(results), "Certified paths, re-drawn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
