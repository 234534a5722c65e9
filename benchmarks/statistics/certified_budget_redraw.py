"""Does the certified budget hold? Re-draws of calibration and test rows on the real task (issue 42).

``make demo``'s MiniLM-L6, fine-tuned on Rotten Tomatoes and frozen, gets mean-pooled MLP exit
heads trained once on the train split (``fit_exit_heads``, heads only; early stopping on the
train split's last batches). The validation and test splits (4,000 labelled snippets the heads
never saw) are the pool: every head runs once over it, and every candidate of the certified
grid (``certified_candidates``: 401 entropy thresholds) is replayed once. Then, ``--draws``
times, the pool is split at random into calibration rows and test rows, and for each budget,
confidence and risk:

- ``certified``: what ``calibrate(..., max_drop=budget, confidence=confidence)`` picks on the
  calibration rows (fixed-sequence testing as the package does: exact binomial p-values for
  disagreement, betting p-values for the accuracy lost);
- ``uncertified``: the fewest mean layers of the same grid within the budget on the calibration
  rows (what calibrating without a guarantee picks);
- ``oracle``: the fewest mean layers of the grid within the budget on the **test** rows
  themselves (the best any threshold could do there; not a usable calibration).

A violation is a drop over the budget: accuracy points lost against the full model (risk
``accuracy``) or disagreement with it (risk ``agreement``). Two readings of it:

- ``test split`` (what a user sees on a held-out split): the drop on the draw's test rows. It
  carries the test rows' own sampling noise, and on a finite pool a calibration draw that looks
  lucky leaves a test draw that looks unlucky (they share the pool's errors).
- ``population`` (what the guarantee states): the calibration rows drawn with replacement from
  the pool, which is then the distribution itself, and the drop over the whole pool.

The certified violation rate in the population reading must stay at or below ``1 - confidence``;
the price of the guarantee is its test mean layers minus the oracle's.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/statistics/certified_budget_redraw.py \\
        --output benchmarks/results/amd_epyc/certified_calibration_cpu.json --readme docs/benchmarks.md
    .venv/bin/python benchmarks/statistics/certified_budget_redraw.py \\
        --from-json benchmarks/results/amd_epyc/certified_calibration_cpu.json --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.methods.risk_control import betting_p_values, binomial_cdf
from earlyexit_kernels.training import fit_exit_heads
from earlyexit_kernels.training.calibrate_model import record_exits
from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches, shuffled_batches

BUDGETS = (0.5, 1.0, 2.0)  # points
CONFIDENCES = (0.9, 0.95)
RISKS = ("accuracy", "agreement")
START, END = "<!-- certified-calibration:start -->", "<!-- certified-calibration:end -->"


def pool_record(seed: int):
    """``(record, fit_seconds)``: mean-pooled MLP heads trained on the train split of the fine-tuned MiniLM-L6,
    then every head recorded on the pool (the validation and test splits)."""
    model, tokenizer, _ = real_task.fine_tuned_minilm(progress=False)
    eek.patch(model, eek.Entropy(0.0), pooling="mean", head="mlp")
    splits = real_task.load_rotten_tomatoes()

    def encoded(names):
        texts = [t for n in names for t in splits[n].texts]
        labels = [y for n in names for y in splits[n].labels]
        data = LabelledTexts(texts, None, labels, "rotten tomatoes", "label")
        return encode(tokenizer, data, 128), torch.tensor(labels)

    train, train_labels = encoded(["train"])
    started = time.perf_counter()
    fit_exit_heads(model, shuffled_batches(train, train_labels, 32, seed), method="heads", progress=False, seed=seed)
    fit_seconds = time.perf_counter() - started
    pool, pool_labels = encoded(["validation", "test"])
    return record_exits(model, length_sorted_batches(pool, pool_labels, 64)), fit_seconds


def pool_decisions(seed: int) -> dict:
    """Per grid candidate and pool row: the exit's class and layers run; the full model's class; the labels."""
    record, fit_seconds = pool_record(seed)
    grid = certified_candidates(eek.Entropy(0.0), record.num_layers, record.all_logits.shape[-1])
    exit_class, layers = [], []
    for policy in grid:
        result = replay(policy, record)
        exit_class.append(result.logits.argmax(-1))
        layers.append(result.layers_run.float())
    return {
        "grid": grid,
        "exit_class": torch.stack(exit_class),
        "layers": torch.stack(layers),
        "full_class": record.all_logits[-1].float().argmax(-1),
        "labels": record.labels,
        "layer_accuracy": [float((record.all_logits[k].argmax(-1) == record.labels).double().mean()) for k in range(6)],
        "fit_seconds": fit_seconds,
    }


def simulate(decisions: dict, calibration_rows: int, draws: int, seed: int) -> list[dict]:
    """One row per (budget, confidence, risk): violation rates and mean layers of the three choices."""
    exit_class, layers = decisions["exit_class"], decisions["layers"]
    full_class, labels = decisions["full_class"], decisions["labels"]
    rows = labels.numel()
    exit_right = exit_class == labels
    full_right = full_class == labels
    losses = {
        "accuracy": full_right.double() - exit_right.double(),  # paired per row: +1, 0 or -1
        "agreement": (exit_class != full_class).double(),
    }
    p_tables = {  # P(Binomial(n, budget) <= k) for every count k: the exact p-values, looked up
        b: torch.tensor([binomial_cdf(k, calibration_rows, b / 100) for k in range(calibration_rows + 1)])
        for b in BUDGETS
    }
    generator = torch.Generator().manual_seed(seed)
    pool_drop = {
        "accuracy": 100 * (full_right.double().mean() - exit_right.double().mean(1)),
        "agreement": 100 * losses["agreement"].mean(1),
    }
    tallies = {}
    for _ in range(draws):
        order = torch.randperm(rows, generator=generator)
        cal, test = order[:calibration_rows], order[calibration_rows:]
        drawn = torch.randint(0, rows, (calibration_rows,), generator=generator)  # the population reading
        for risk in RISKS:
            if risk == "accuracy":
                drop_drawn = 100 * (full_right[drawn].double().mean() - exit_right[:, drawn].double().mean(1))
            else:
                drop_drawn = 100 * losses[risk][:, drawn].mean(1)
            for budget in BUDGETS:
                uncertified = _fewest_layers(layers[:, drawn].mean(1), drop_drawn <= budget + 1e-9)
                p_values = _p_values(losses[risk][:, drawn], risk, budget, p_tables)
                for confidence in CONFIDENCES:
                    failed = (p_values > 1 - confidence).nonzero()
                    certified = max((int(failed[0]) if failed.numel() else len(p_values)) - 1, 0)
                    tally = tallies.setdefault((risk, budget, confidence), _empty())
                    tally["certified_population_over"] += bool(pool_drop[risk][certified] > budget + 1e-9)
                    tally["uncertified_population_over"] += bool(pool_drop[risk][uncertified] > budget + 1e-9)
        mean_layers_test = layers[:, test].mean(1)
        mean_layers_cal = layers[:, cal].mean(1)
        for risk in RISKS:
            if risk == "accuracy":
                drop_cal = 100 * (full_right[cal].double().mean() - exit_right[:, cal].double().mean(1))
                drop_test = 100 * (full_right[test].double().mean() - exit_right[:, test].double().mean(1))
            else:
                drop_cal = 100 * losses[risk][:, cal].mean(1)
                drop_test = 100 * losses[risk][:, test].mean(1)
            for budget in BUDGETS:
                uncertified = _fewest_layers(mean_layers_cal, drop_cal <= budget + 1e-9)
                oracle = _fewest_layers(mean_layers_test, drop_test <= budget + 1e-9)
                p_values = _p_values(losses[risk][:, cal], risk, budget, p_tables)
                for confidence in CONFIDENCES:
                    failed = (p_values > 1 - confidence).nonzero()
                    last = (int(failed[0]) if failed.numel() else len(p_values)) - 1
                    certified = max(last, 0)
                    tally = tallies.setdefault((risk, budget, confidence), _empty())
                    tally["draws"] += 1
                    tally["nothing_certified"] += last < 1 or bool(mean_layers_cal[certified] >= 5.999)
                    for name, index in (("certified", certified), ("uncertified", uncertified), ("oracle", oracle)):
                        tally[f"{name}_layers"] += float(mean_layers_test[index])
                        tally[f"{name}_over"] += bool(drop_test[index] > budget + 1e-9)
                        tally[f"{name}_drop"] += float(drop_test[index])
                    tally["price"].append(float(mean_layers_test[certified] - mean_layers_test[oracle]))
    out = []
    for (risk, budget, confidence), t in sorted(tallies.items()):
        n = t["draws"]
        prices = sorted(t["price"])
        out.append(
            {
                "risk": risk,
                "budget": budget,
                "confidence": confidence,
                "calibration_rows": calibration_rows,
                "test_rows": rows - calibration_rows,
                "draws": n,
                **{f"{k}_rate": t[f"{k}_over"] / n for k in ("certified", "uncertified", "oracle")},
                **{f"{k}_population_rate": t[f"{k}_population_over"] / n for k in ("certified", "uncertified")},
                **{f"{k}_layers": t[f"{k}_layers"] / n for k in ("certified", "uncertified", "oracle")},
                **{f"{k}_drop": t[f"{k}_drop"] / n for k in ("certified", "uncertified", "oracle")},
                "price_mean": sum(prices) / n,
                "price_p90": prices[int(0.9 * (n - 1))],
                "nothing_certified": t["nothing_certified"] / n,
            }
        )
    return out


def _p_values(losses: torch.Tensor, risk: str, budget: float, p_tables: dict) -> torch.Tensor:
    """Every candidate's p-value of "risk > budget" on these rows, as the package computes it."""
    if risk == "accuracy":
        return betting_p_values(losses, budget / 100)
    return p_tables[budget][losses.sum(1).long()]


def _empty() -> dict:
    tally = {"draws": 0, "nothing_certified": 0, "price": [], "certified_population_over": 0}
    tally["uncertified_population_over"] = 0
    for name in ("certified", "uncertified", "oracle"):
        tally.update({f"{name}_layers": 0.0, f"{name}_over": 0, f"{name}_drop": 0.0})
    return tally


def _fewest_layers(mean_layers: torch.Tensor, feasible: torch.Tensor) -> int:
    """The index of the fewest mean layers among the feasible candidates (index 0, never early, when none)."""
    if not bool(feasible.any()):
        return 0
    masked = torch.where(feasible, mean_layers, torch.full_like(mean_layers, float("inf")))
    return int(masked.argmin())


def table(results: dict) -> str:
    lines = [
        f"<!-- generated by python benchmarks/statistics/certified_budget_redraw.py --from-json {results['source']} -->",
        "",
        f"{results['draws']} random re-draws of calibration and test rows from the {results['pool_rows']} labelled "
        f"validation and test snippets (heads fixed: mean-pooled MLP heads of the fine-tuned MiniLM-L6, trained "
        f"once on the train split); {results['cpu']}. `over`: the share of draws whose drop exceeds the budget, "
        f"in the population (calibration rows drawn with replacement from the pool, the drop over the whole pool: "
        f"what the guarantee states, at most 1 - confidence) and on the test split (the draw's other rows); layers: "
        f"mean layers run on the test rows, of 6; `price`: certified layers minus the test oracle's (mean over "
        f"draws / 90th percentile). Risk `accuracy` certifies and reads the accuracy points lost, `agreement` "
        f"the disagreement with the full model.",
        "",
        "| risk | cal. rows | budget | confidence | certified over: population / test split | layers "
        "| uncertified over: population / test split | layers | test oracle layers | price (mean / p90) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['risk']} | {r['calibration_rows']} | {r['budget']:g} | {r['confidence']:g} "
            f"| {100 * r['certified_population_rate']:.1f}% / {100 * r['certified_rate']:.1f}% "
            f"| {r['certified_layers']:.2f} "
            f"| {100 * r['uncertified_population_rate']:.1f}% / {100 * r['uncertified_rate']:.1f}% "
            f"| {r['uncertified_layers']:.2f} | {r['oracle_layers']:.2f} "
            f"| {r['price_mean']:+.2f} / {r['price_p90']:+.2f} |"
        )
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    page = path.read_text()
    if START not in page:
        raise SystemExit(f"{path} has no {START} ... {END} block to fill")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--calibration-rows", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    parser.add_argument(
        "--decisions", default=None, help="keep the pool's replayed decisions in this file (reused when it exists)"
    )
    parser.add_argument("--from-json", default=None, help="read results written by --output instead of running")
    parser.add_argument("--readme", default=None, help="fill the certified-calibration block of this markdown file")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        started = time.perf_counter()
        if args.decisions and Path(args.decisions).is_file():
            decisions = torch.load(args.decisions, weights_only=False)
        else:
            decisions = pool_decisions(args.seed)
            if args.decisions:
                torch.save(decisions, args.decisions)
        rows = []
        for calibration_rows in args.calibration_rows:
            rows += simulate(decisions, calibration_rows, args.draws, args.seed + 1)
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
        results = {
            "source": args.output or "(not saved)",
            "draws": args.draws,
            "pool_rows": int(decisions["labels"].numel()),
            "cpu": f"{cpu}, {torch.get_num_threads()} threads",
            "heads_fit_seconds": decisions["fit_seconds"],
            "layer_accuracy": decisions["layer_accuracy"],
            "seconds": time.perf_counter() - started,
            "rows": rows,
        }
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    if args.readme:
        write_readme(Path(args.readme), text)


if __name__ == "__main__":
    main()
