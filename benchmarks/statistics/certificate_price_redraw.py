"""What each guarantee costs, and whether it holds: re-draws through ``certify`` on synthetic populations (issue 77).

A population of exit records (``--population`` rows, 2 labels, ``--layers`` layers) is drawn once, in one of
two shapes (``--shape``):

- ``evidence-walk`` (the default, shaped like the real records of issue 77's outside study): each row carries an
  evidence toward its label that every layer adds to, with noise, and a head answers the sign of what it has seen so
  far, as sure as it is large; the full model's answer carries more noise of its own, so that early heads are right
  on some rows it gets wrong. At 12 layers the oracle sits near 4.2 of 12 with about 6% of the rows discordant there
  (the study's 12-layer shape: 5.8%; all-mpnet-base-v2 on Rotten Tomatoes: a path oracle of 4.18).
- ``sure-heads``: a head below its row's difficulty answers as the full model does but on 3% of the rows, and is
  sure where it agrees with it; its risk rises slowly with the threshold near the budget (few discordant rows).

It is the distribution itself: ``--draws`` times, ``--rows``
calibration rows are drawn from it with replacement **and put in the order production records them**
(length-sorted batches: the rows carry lengths, the longer ones harder), then certified by ``certify``
end to end on the package's fixed grid (401 entropy thresholds), accuracy lost at ``--budget`` points,
95%, under each guarantee:

- ``probable``: the exact paired test, walked in order (the default);
- ``expected``: conformal risk control;
- ``z test (reference)``: the same walk with the normal approximation of the exact test's statistic, no
  guarantee (asymptotic only): what any test at this confidence costs on these rows, so the exact test's price
  above it is what exactness costs.

Every walk reads the same draws. With ``--unlabelled-rows U`` each draw also takes U rows without their
labels, recorded in production's order too, and certifies ``probable`` with them (prediction-powered, as ``eek
fit --unlabelled`` does without validation rows): that certificate's re-draw test alone.

Against the population oracle (the fewest mean layers of the grid whose risk on the whole population is
within the budget): ``price`` = the certified mean layers minus the oracle's, in layers; ``violations`` =
the share of draws whose certified candidate's population risk is over the budget (``probable`` promises at
most 5%: it ``holds`` unless the violations' exact 99% lower bound is over 5%); ``mean served risk`` with its
standard error (``expected`` promises at most the budget: it ``holds`` unless the mean is over the budget by 2.6
standard errors).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/statistics/certificate_price_redraw.py \\
        --layers 12 --draws 2000 --output benchmarks/results/amd_epyc/certificate_price_redraw_walk_12.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.script_results import run_conditions, write_json
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.paired_exact import score_value
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.risk_control import fixed_sequence, upper_bound
from earlyexit_kernels.training.labelled_texts import order_by_length

#: the evidence walk's shape: the mean and spread of a row's evidence a layer, the walk's noise, and the full
#: model's own noise (set once, to the study's 12-layer shape; the 6-layer population takes the same)
WALK = {"drift": 3.5, "spread": 2.0, "walk": 1.5, "final": 1.25}


def evidence_walk(rows: int, layers: int, seed: int) -> tuple[ExitRecord, torch.Tensor]:
    """The records of ``rows`` rows and their token lengths: a row's evidence toward its label is added to layer
    by layer with noise (a random walk, scaled so that every depth's spread is comparable), a head answers the
    sign of the evidence so far and is as sure as it is large; the last layer's answer has noise of its own
    (``WALK``). Rows of little evidence (hard) are longer, so production's length-sorted order puts the rows
    that carry the losses together, at the end."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    evidence = WALK["drift"] + WALK["spread"] * torch.randn(rows, generator=g)
    steps = evidence / layers + WALK["walk"] / layers**0.5 * torch.randn(layers, rows, generator=g)
    seen = torch.cumsum(steps, 0) * layers / torch.arange(1, layers + 1).reshape(-1, 1) ** 0.5
    seen[-1] += WALK["final"] * layers**0.5 * torch.randn(rows, generator=g)
    answers = torch.where(seen > 0, labels, 1 - labels)
    logits = torch.zeros(layers, rows, 2)
    logits.scatter_(2, answers.unsqueeze(-1), seen.abs().unsqueeze(-1))
    hardness = (WALK["drift"] - evidence) / WALK["spread"]
    lengths = (40 + 25 * hardness + 16 * torch.randn(rows, generator=g)).clamp(4, 256).round().long()
    return ExitRecord(logits, labels, None, None, Entropy(0.3)), lengths


def sure_heads(rows: int, layers: int, seed: int) -> tuple[ExitRecord, torch.Tensor]:
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


CONFIDENCE = 0.95
SHAPES = {"evidence-walk": evidence_walk, "sure-heads": sure_heads}


#: the walks measured on every draw: ``certify``'s two guarantees, and the normal test the exact one is held to
WALKS = ("probable", "expected", "z test (reference)")
#: with ``--unlabelled-rows``: the probable certificate with that many unlabelled rows too (prediction-powered)
POWERED = "probable, prediction-powered"


def z_test_index(sample: ExitRecord, grid, budget: float) -> int:
    """The candidate a fixed-sequence walk keeps with the normal approximation of the exact test's score statistic
    (reject where it is at most -z): not a guarantee (its level is only asymptotic), the reference for what
    any test at this confidence costs on these rows (issue 77's "normal z test")."""
    z = NormalDist().inv_cdf(CONFIDENCE)

    def p_value(i: int) -> float:
        losses = row_losses(replay(grid[i], sample).logits, sample, "accuracy")
        a, b = int((losses == 1).sum()), int((losses == -1).sum())
        return 0.0 if score_value(a, b, losses.numel(), budget) <= -z else 1.0

    return max(fixed_sequence(p_value, len(grid), 0.5), 0)


def production_order(lengths: torch.Tensor) -> torch.Tensor:
    """The positions of rows of these token counts in the order ``eek fit`` records them (longest first)."""
    return torch.tensor(order_by_length(lengths))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, says in (
        ("--layers", int, 12, "the population's layers"),
        ("--population", int, 200_000, "its rows"),
        ("--rows", int, 1_500, "calibration rows a draw"),
        ("--budget", float, 1.0, "accuracy points lost"),
        ("--draws", int, 200, "draws a guarantee"),
        ("--threads", int, 1, "torch's threads"),
        (
            "--unlabelled-rows",
            int,
            0,
            "unlabelled rows a draw beside the labelled ones: the prediction-powered "
            "certificate alone (its labels dropped; 0: the walks above)",
        ),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{says} (default: {default})")
    parser.add_argument("--shape", choices=SHAPES, default="evidence-walk", help="the population's shape")
    parser.add_argument("--output", type=Path, help="the JSON to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record, lengths = SHAPES[args.shape](args.population, args.layers, seed=0)
    budget = args.budget / 100.0
    grid = certified_candidates(record.policy, args.layers, 2)
    outs = [replay(p, record) for p in grid]
    risk = torch.stack([row_losses(out.logits, record, "accuracy") for out in outs]).mean(1)
    layers = torch.tensor([out.layers_run.double().mean().item() for out in outs])
    within = (risk <= budget).nonzero().squeeze(-1)
    oracle = float(layers[within].min())
    oracle_index = int(within[layers[within].argmin()])
    discordant = float((row_losses(outs[oracle_index].logits, record, "accuracy") != 0).double().mean())
    full_accuracy = float((record.all_logits[-1].argmax(-1) == record.labels).double().mean())
    print(
        f"population: oracle {oracle:.2f} of {args.layers} layers, {100 * discordant:.1f}% discordant rows there, "
        f"full model right on {100 * full_accuracy:.1f}%"
    )
    g = torch.Generator().manual_seed(1)
    walks = (POWERED,) if args.unlabelled_rows else WALKS
    served = {name: [] for name in walks}
    certified_layers = {name: [] for name in walks}
    for draw in range(args.draws):  # every walk on the same draws: their prices differ by less noise
        picked = torch.randint(0, args.population, (args.rows,), generator=g)
        sample = record.subset(picked[production_order(lengths[picked])])
        for name in walks:
            if name == "z test (reference)":
                index = z_test_index(sample, grid, budget)
            elif name == POWERED:  # the unlabelled rows recorded as production records them too, labels dropped
                more = torch.randint(0, args.population, (args.unlabelled_rows,), generator=g)
                more = record.subset(more[production_order(lengths[more])])
                unlabelled = ExitRecord(more.all_logits, None, None, None, more.policy)
                chosen, certificate, _ = certify(sample, budget, CONFIDENCE, target="accuracy", unlabelled=unlabelled)
                assert certificate.unlabelled_use == "powered"  # no validation rows: the bound on every draw
                index = grid.index(chosen.policy)
            else:
                chosen = certify(sample, budget, CONFIDENCE, target="accuracy", guarantee=name)[0]
                index = grid.index(chosen.policy)
            served[name].append(float(risk[index]))
            certified_layers[name].append(float(layers[index]))
        if draw % 50 == 49:
            print(f"  {draw + 1} draws, {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for guarantee in walks:
        n = args.draws
        over = sum(r > budget for r in served[guarantee])
        mean = sum(served[guarantee]) / n
        sd = math.sqrt(sum((r - mean) ** 2 for r in served[guarantee]) / (n - 1))
        mean_layers = sum(certified_layers[guarantee]) / n
        price = mean_layers - oracle
        price_sd = math.sqrt(sum((x - mean_layers) ** 2 for x in certified_layers[guarantee]) / (n - 1))
        # each guarantee's re-draw test: probable fails where the violations' exact 99% lower bound passes
        # 1 - confidence, expected where the mean served risk passes the budget by 2.6 standard errors
        lower, upper = 1.0 - upper_bound(n - over, n, 0.99), upper_bound(over, n, 0.99)
        holds = lower <= 1.0 - CONFIDENCE if guarantee != "expected" else mean <= budget + 2.6 * sd / math.sqrt(n)
        results[guarantee] = {
            "price_layers": round(price, 3),
            "price_layers_se": round(price_sd / math.sqrt(n), 3),
            "mean_layers": round(mean_layers, 3),
            "violations": round(over / n, 4),
            "violations_lower_99": round(lower, 4),
            "violations_upper_99": round(upper, 4),
            "mean_served_risk": round(mean, 5),
            "mean_served_risk_se": round(sd / math.sqrt(n), 5),
            "holds": bool(holds),
        }
        print(f"{guarantee}: {results[guarantee]}")
    out = {
        **run_conditions("benchmarks/statistics/certificate_price_redraw.py", argv, started),
        "layers": args.layers,
        "shape": args.shape,
        **({"walk": WALK} if args.shape == "evidence-walk" else {}),
        "population": args.population,
        "rows": args.rows,
        "unlabelled_rows": args.unlabelled_rows,
        "budget_points": args.budget,
        "draws": args.draws,
        "oracle_layers": round(oracle, 3),
        "discordant_at_oracle": round(discordant, 4),
        "full_accuracy": round(full_accuracy, 4),
        "results": results,
    }
    if args.output:
        write_json(args.output, out)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
