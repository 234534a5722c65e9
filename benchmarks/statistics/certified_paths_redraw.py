"""Does the certificate hold along the path chosen on validation rows? Re-draws on the real task (issue 52).

The pool is ``benchmarks/statistics/certified_budget_redraw.py``'s: ``make demo``'s MiniLM-L6 fine-tuned on
Rotten Tomatoes with mean-pooled MLP exit heads trained on the train split (heads only), its
validation and test splits (4,000 rows no training step saw) recorded once. Each draw then takes, with replacement from the pool, path
rows (what ``eek fit``'s validation rows do: choose the path, build the per-layer one) and
calibration rows, and runs :func:`~earlyexit_kernels.calibration.certify.certify` with
both (``path_record=``), as ``eek fit`` does. The certified policy's risk is measured on the
whole pool (the population the rows were drawn from: what the guarantee states). A violation is
a risk over the budget; its rate must stay at or below ``1 - confidence`` for every path chosen.
The uncertified point of the same path on the same calibration rows is counted beside it, and the same
calibration rows certified along the global grid alone (no path rows): the layers choosing a path saved against
it on the pool, paired by draw (issue 108: where a path does not win, ``eek fit`` keeps what it kept before).

With ``--unlabelled-rows U`` (issue 62) the draws hold the accuracy-lost certificate with unlabelled rows
instead: each draw also takes U rows with their labels dropped, and four certificates are made on the
same rows: the labelled rows alone (the path chosen on the path rows); labelled and unlabelled rows as
``eek fit --unlabelled`` makes it (prediction-powered only where the path rows predict fewer layers with
it, else the labelled rows alone); and, on the fixed grid without path rows, the labelled rows alone and
the prediction-powered certificate every time (the default weight: the bound itself, never falling
back). Each violation rate must stay at or below ``1 - confidence``.

    .venv/bin/python benchmarks/statistics/certified_paths_redraw.py --output benchmarks/results/amd_epyc/certified_paths_redraw_cpu.json \\
        --readme docs/benchmarks.md
    .venv/bin/python benchmarks/statistics/certified_paths_redraw.py --unlabelled-rows 2800 --calibration-rows 1500 \\
        --confidence 0.9 0.95 --pool /tmp/pool.pt --output benchmarks/results/amd_epyc/certified_paths_redraw_unlabelled_cpu.json \\
        --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch
from certified_budget_redraw import pool_record  # the same heads on the same pool (this folder is on sys.path)

from benchmarks.suite.script_results import run_conditions, write_json, write_section
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.calibration.row_losses import row_losses

START, END = "<!-- certified-paths-redraw:start -->", "<!-- certified-paths-redraw:end -->"
UNLABELLED_START, UNLABELLED_END = (
    "<!-- certified-paths-redraw-unlabelled:start -->",
    "<!-- certified-paths-redraw-unlabelled:end -->",
)
RISKS = ("agreement", "accuracy")
#: the certificates each draw makes with unlabelled rows: (name, uses the unlabelled rows, path rows given)
UNLABELLED_WAYS = (
    ("labelled rows alone", False, True),
    ("labelled + unlabelled, as eek fit", True, True),
    ("labelled rows alone, fixed grid", False, False),
    ("labelled + unlabelled, prediction-powered always (fixed grid)", True, False),
)


def simulate(record, *, budget: float, confidence: float, calibration_rows: int, path_rows: int, draws: int, seed):
    rows = record.all_logits.shape[1]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for risk in RISKS:
        tally = {"draws": 0, "certified_over": 0, "uncertified_over": 0, "layers": 0.0, "paths": {}, "saved": []}
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
            layers = replay(chosen.policy, record).layers_run.float().mean().item()
            tally["layers"] += layers
            tally["paths"][certificate.path] = tally["paths"].get(certificate.path, 0) + 1
            # the same calibration rows certified along the global grid alone: what choosing a path saved
            global_chosen, _, _ = certify(calibration, budget, confidence, target=risk)
            tally["saved"].append(replay(global_chosen.policy, record).layers_run.float().mean().item() - layers)
        n = tally["draws"]
        saved = per_draw(tally["saved"])
        out.append(
            {
                "risk": risk,
                "budget": budget,
                "confidence": confidence,
                "calibration_rows": calibration_rows,
                "path_rows": path_rows,
                "seed": seed,
                "draws": n,
                "certified_rate": tally["certified_over"] / n,
                "uncertified_rate": tally["uncertified_over"] / n,
                "certified_layers": tally["layers"] / n,
                "paths": tally["paths"],
                # paired, per draw: the global grid's layers on the pool minus the chosen path's (> 0: it saved)
                "saved_vs_global": saved["mean"],
                "saved_vs_global_se": saved["se"],
                "draws_worse_than_global": saved["draws_below"],
                # per draw, in draw order: another rule's run with the same --seed draws the same rows, so the
                # two rules' savings pair by draw
                "saved_per_draw": [round(v, 6) for v in tally["saved"]],
            }
        )
    return out


def simulate_unlabelled(
    record,
    *,
    budget: float,
    confidence: float,
    calibration_rows: int,
    path_rows: int,
    unlabelled_rows: int,
    draws,
    seed,
):
    """The accuracy-lost certificates of ``UNLABELLED_WAYS`` on the same draws: labelled calibration rows, path
    rows and ``unlabelled_rows`` rows without labels, each drawn with replacement from the pool."""
    rows = record.all_logits.shape[1]
    generator = torch.Generator().manual_seed(seed)
    tallies = {name: {"over": 0, "layers": 0.0, "powered": 0, "bound": 0.0} for name, _, _ in UNLABELLED_WAYS}
    for _ in range(draws):
        calibration = record.subset(torch.randint(0, rows, (calibration_rows,), generator=generator))
        path = record.subset(torch.randint(0, rows, (path_rows,), generator=generator))
        unlabelled = dataclasses.replace(
            record.subset(torch.randint(0, rows, (unlabelled_rows,), generator=generator)), labels=None
        )
        for name, with_unlabelled, with_path in UNLABELLED_WAYS:
            chosen, certificate, _ = certify(
                calibration,
                budget,
                confidence,
                target="accuracy",
                path_record=path if with_path else None,
                unlabelled=unlabelled if with_unlabelled else None,
            )
            served = replay(chosen.policy, record)
            tally = tallies[name]
            tally["over"] += float(row_losses(served.logits, record, "accuracy").mean()) > budget + 1e-12
            tally["layers"] += served.layers_run.float().mean().item()
            tally["powered"] += certificate.unlabelled_use == "powered"
            tally["bound"] += certificate.bound
    return [
        {
            "way": name,
            "budget": budget,
            "confidence": confidence,
            "calibration_rows": calibration_rows,
            "path_rows": path_rows if with_path else 0,
            "unlabelled_rows": unlabelled_rows if with_unlabelled else 0,
            "draws": draws,
            "certified_rate": tallies[name]["over"] / draws,
            "certified_layers": tallies[name]["layers"] / draws,
            "powered_share": tallies[name]["powered"] / draws,
            "mean_bound": tallies[name]["bound"] / draws,
        }
        for name, with_unlabelled, with_path in UNLABELLED_WAYS
    ]


def render_unlabelled(results: dict) -> str:
    first = results["rows"][0]
    lines = [
        UNLABELLED_START,
        f"Measured {results['date']} on {results['cpu']} ({results['command']}, {results['seconds']:.0f} s): "
        f"{results['pool_rows']:,} pool rows; each draw takes {first['calibration_rows']:,} labelled calibration "
        f"rows, {first['path_rows']:,} path rows and {results['unlabelled_rows']:,} rows whose labels are dropped, "
        "with replacement, and makes the four certificates of accuracy lost on them; the risk of each chosen "
        "policy measured on the whole pool.",
        "",
        "| certificate | budget | confidence | draws | violation rate | mean layers on the pool "
        "| prediction-powered in | mean certified bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['way']} | {100 * r['budget']:g} point | {100 * r['confidence']:g}% | {r['draws']} "
            f"| {100 * r['certified_rate']:.1f}% | {r['certified_layers']:.2f} | {r['powered_share']:.0%} of draws "
            f"| {100 * r['mean_bound']:.2f} points |"
        )
    lines.append(UNLABELLED_END)
    return "\n".join(lines) + "\n"


def per_draw(values) -> dict:
    """A per-draw difference's ``mean``, its standard error ``se`` (None from one draw) and the draws on either
    side of 0 (``draws_above``, ``draws_below``)."""
    values = torch.tensor(values, dtype=torch.float64)
    n = len(values)
    return {
        "mean": float(values.mean()),
        "se": float(values.std() / n**0.5) if n > 1 else None,
        "draws_above": int((values > 1e-9).sum()),
        "draws_below": int((values < -1e-9).sum()),
    }


def paired_against(rows: list[dict], pool_rows: int, other: dict) -> list[dict]:
    """Per risk, this run's saving against the global grid minus ``other``'s (a run of another rule with the same
    --seed, pool and settings, so the same rows each draw): its mean, standard error and the draws either way."""
    theirs = {(r["risk"], r["confidence"]): r for r in other["rows"]}
    out = []
    for r in rows:
        them = theirs.get((r["risk"], r["confidence"]))
        if them is None or "saved_per_draw" not in them or len(them["saved_per_draw"]) != len(r["saved_per_draw"]):
            raise SystemExit(f"error: --against has no per-draw savings of {r['risk']} over {r['draws']} draws")
        drawn = ("seed", "path_rows", "calibration_rows", "budget")
        if [them.get(k) for k in drawn] != [r.get(k) for k in drawn] or other["pool_rows"] != pool_rows:
            raise SystemExit(
                "error: --against drew other rows (its seed, pool, budget or path or calibration row counts differ); "
                "pair runs of the same settings"
            )
        gain = per_draw([a - b for a, b in zip(r["saved_per_draw"], them["saved_per_draw"], strict=True)])
        out.append(
            {
                "risk": r["risk"],
                "confidence": r["confidence"],
                "gain": gain["mean"],
                "gain_se": gain["se"],
                "draws_better": gain["draws_above"],
                "draws_worse": gain["draws_below"],
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
        "| saved against the global grid alone (draws worse) | uncertified: violation rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        paths = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(r["paths"].items()))
        saved = "not measured"  # recorded before the paired global certificate was made
        if r.get("saved_vs_global") is not None:
            se = r.get("saved_vs_global_se")
            saved = f"{r['saved_vs_global']:+.3f}" + (f" ± {se:.3f}" if se is not None else "")
            saved += f" ({r['draws_worse_than_global']})"
        lines.append(
            f"| {r['risk']} | {100 * r['budget']:g} point | {100 * r['confidence']:g}% | {r['draws']} | {paths} | "
            f"{100 * r['certified_rate']:.1f}% | {r['certified_layers']:.2f} | {saved} | "
            f"{100 * r['uncertified_rate']:.1f}% |"
        )
    against = results.get("against")
    if against:
        lines.append("")
        lines.append(
            f"Against {against['note']} (`{against['file']}`, the same draws): the layers this rule saved minus "
            "what that one saved, per draw: "
            + "; ".join(
                f"{g['risk']} {g['gain']:+.3f} ± {g['gain_se']:.3f} (better on {g['draws_better']} draws, "
                f"worse on {g['draws_worse']})"
                for g in against["rows"]
            )
            + "."
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
    parser.add_argument(
        "--unlabelled-rows",
        type=int,
        default=0,
        help="re-draw the accuracy-lost certificates with this many unlabelled rows",
    )
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.95])
    parser.add_argument("--pool", type=Path, help="keep the pool's record in this file (reused when it exists)")
    parser.add_argument(
        "--against",
        type=Path,
        help="another rule's result file of a run with the same --seed, pool and settings: the savings paired by draw",
    )
    parser.add_argument("--against-note", default="the other rule", help="what --against's run was, for the text")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        started = time.perf_counter()
        if args.pool is not None and args.pool.is_file():
            record = torch.load(args.pool, weights_only=False)
        else:
            record, _ = pool_record(args.seed)
            if args.pool is not None:
                torch.save(record, args.pool)
        rows = []
        for confidence in args.confidence:
            settings = dict(budget=0.01, confidence=confidence, calibration_rows=args.calibration_rows)
            settings.update(path_rows=args.path_rows, draws=args.draws, seed=args.seed)
            if args.unlabelled_rows:
                rows += simulate_unlabelled(record, unlabelled_rows=args.unlabelled_rows, **settings)
            else:
                rows += simulate(record, **settings)
        results = {
            **run_conditions("benchmarks/statistics/certified_paths_redraw.py", argv, started),
            "pool_rows": record.all_logits.shape[1],
            "unlabelled_rows": args.unlabelled_rows,
            "rows": rows,
        }
    if args.against is not None:
        other = json.loads(args.against.read_text())
        results["against"] = {
            "file": str(args.against),
            "note": args.against_note,
            "rows": paired_against(results["rows"], results["pool_rows"], other),
        }
    if args.output and (args.against is not None or not args.from_json):
        write_json(args.output, results)
    if results.get("unlabelled_rows"):
        text, start, end, title = render_unlabelled(results), UNLABELLED_START, UNLABELLED_END, "with unlabelled rows"
    else:
        text, start, end, title = render(results), START, END, "Certified paths, re-drawn"
    print(text)
    if args.readme:
        write_section(args.readme, start, end, text, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
