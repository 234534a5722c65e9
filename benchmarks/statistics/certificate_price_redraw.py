"""What each guarantee costs, and whether it holds: re-draws through ``certify`` on synthetic populations (issue 77).

A population of exit records (``--population`` rows, 2 labels, ``--layers`` layers) is drawn once: each row
has a difficulty, deeper heads are right and sure on harder rows, some sure heads are wrong, and the full
model is right on 90% of the rows. It is the distribution itself: ``--draws`` times, ``--rows``
calibration rows are drawn from it with replacement **and put in the order production records them**
(length-sorted batches: the rows carry lengths, the longer ones harder), then certified by ``certify``
end to end on the package's fixed grid (401 entropy thresholds), accuracy lost at ``--budget`` points,
95%, under each guarantee:

- ``probable``: the exact paired test, walked in order (the default);
- ``expected``: conformal risk control.

Against the population oracle (the fewest mean layers of the grid whose risk on the whole population is
within the budget): ``price`` = the certified mean layers minus the oracle's, in layers; ``violations`` =
the share of draws whose certified candidate's population risk is over the budget (``probable`` promises at
most 5%; its 99% upper bound is printed); ``mean served risk`` with its standard error (``expected``
promises at most the budget).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/statistics/certificate_price_redraw.py \\
        --layers 12 --draws 200 --output benchmarks/results/amd_epyc/certificate_price_redraw_12.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.script_results import run_conditions, write_json
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.losses import row_losses
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.training.labelled_texts import Encoded, length_sorted_batches


def population(rows: int, layers: int, seed: int) -> tuple[ExitRecord, torch.Tensor]:
    """The records of ``rows`` rows and their token lengths (longer rows harder): where the row's difficulty is
    below its depth's reach, a head answers as the full model does but on 3% of the rows, and is sure where it
    agrees with it (and on 30% of the rows where it does not); elsewhere it is a coin and unsure. The full model is
    right on 90% of the rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    difficulty = torch.rand(rows, generator=g) ** 1.5
    lengths = (8 + 120 * difficulty + 16 * torch.randn(rows, generator=g)).clamp(4, 256).round().long()
    logits = torch.zeros(layers, rows, 2)
    full_right = torch.rand(rows, generator=g) < 0.9
    for k in range(layers):
        margin = 4.0 * ((k + 1) / layers - difficulty) + 0.8 * torch.randn(rows, generator=g)
        if k == layers - 1:
            right = full_right
        else:
            agrees = full_right ^ (torch.rand(rows, generator=g) < 0.03)
            right = torch.where(margin > 0, agrees, torch.rand(rows, generator=g) < 0.5)
        sure_anyway = torch.rand(rows, generator=g) < 0.3
        sure = torch.where((right == full_right) | sure_anyway, margin.clamp(min=0), torch.zeros_like(margin))
        logits[k, torch.arange(rows), torch.where(right, labels, 1 - labels)] = 0.2 + 1.5 * sure
    return ExitRecord(logits, labels, None, None, Entropy(0.3)), lengths


def production_order(lengths: torch.Tensor) -> torch.Tensor:
    encoded = Encoded([[1] * int(n) for n in lengths], None, 0, int(lengths.max()), 0)
    return torch.cat([batch["rows"] for batch in length_sorted_batches(encoded, None, 64)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, says in (
        ("--layers", int, 12, "the population's layers"),
        ("--population", int, 200_000, "its rows"),
        ("--rows", int, 1_500, "calibration rows a draw"),
        ("--budget", float, 1.0, "accuracy points lost"),
        ("--draws", int, 200, "draws a guarantee"),
        ("--threads", int, 1, "torch's threads"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{says} (default: {default})")
    parser.add_argument("--output", type=Path, help="the JSON to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record, lengths = population(args.population, args.layers, seed=0)
    budget = args.budget / 100.0
    grid = certified_candidates(record.policy, args.layers, 2)
    outs = [replay(p, record) for p in grid]
    risk = torch.stack([row_losses(out.logits, record, "accuracy") for out in outs]).mean(1)
    layers = torch.tensor([out.layers_run.double().mean().item() for out in outs])
    within = (risk <= budget).nonzero().squeeze(-1)
    oracle = float(layers[within].min())
    oracle_index = int(within[layers[within].argmin()])
    discordant = float((row_losses(outs[oracle_index].logits, record, "accuracy") != 0).double().mean())
    print(f"population: oracle {oracle:.2f} of {args.layers} layers, {100 * discordant:.1f}% discordant rows there")
    g = torch.Generator().manual_seed(1)
    results = {}
    for guarantee in ("probable", "expected"):
        served, certified_layers = [], []
        for draw in range(args.draws):
            picked = torch.randint(0, args.population, (args.rows,), generator=g)
            sample = record.subset(picked[production_order(lengths[picked])])
            chosen = certify(sample, budget, 0.95, target="accuracy", guarantee=guarantee)[0]
            index = grid.index(chosen.policy)
            served.append(float(risk[index]))
            certified_layers.append(float(layers[index]))
            if draw % 50 == 49:
                print(f"  {guarantee}: {draw + 1} draws, {time.perf_counter() - started:.0f} s", flush=True)
        n = len(served)
        violations = sum(r > budget for r in served) / n
        mean = sum(served) / n
        sd = math.sqrt(sum((r - mean) ** 2 for r in served) / (n - 1))
        price = sum(certified_layers) / n - oracle
        results[guarantee] = {
            "price_layers": round(price, 3),
            "mean_layers": round(sum(certified_layers) / n, 3),
            "violations": round(violations, 4),
            "violations_upper_99": round(
                min(1.0, violations + 2.326 * math.sqrt(max(violations * (1 - violations), 1e-9) / n)), 4
            ),
            "mean_served_risk": round(mean, 5),
            "mean_served_risk_se": round(sd / math.sqrt(n), 5),
        }
        print(f"{guarantee}: {results[guarantee]}")
    out = {
        **run_conditions("benchmarks/statistics/certificate_price_redraw.py", argv, started),
        "layers": args.layers,
        "population": args.population,
        "rows": args.rows,
        "budget_points": args.budget,
        "draws": args.draws,
        "oracle_layers": round(oracle, 3),
        "discordant_at_oracle": round(discordant, 4),
        "results": results,
    }
    if args.output:
        write_json(args.output, out)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
