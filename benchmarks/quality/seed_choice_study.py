"""Would a choice among fits of several seeds, each certified at a Bonferroni share of the confidence, certify fewer
layers than one fit? An offline study (issue 108).

``eek fit``'s seed draws the validation split of the training file, the heads' first weights and their order; on
MiniLM-L6 Rotten Tomatoes it moves the certified layers by 0.9 on the same calibration rows (docs/benchmarks.md, the
rewritten rows' paragraph). A certificate can take that choice: with k fits whose paths are fixed before a
calibration row is read, walking each path at confidence ``1 - alpha / k`` bounds the chance that any certified point
of any fit is over the budget by ``alpha`` (Bonferroni over the k fixed-sequence walks, as Learn then Test does over
its families), so the point with the fewest mean layers among them is certified at ``1 - alpha``.

For each seed: ``eek fit MODEL train.csv OUT --calibration validation.csv --max-length 128 --seed S`` (``make demo``'s
classifier and splits; a folder already in ``--work`` is reused). Then every folder's saved path is certified again
with the package's :func:`~earlyexit_kernels.calibration.certify.certify` on the calibration rows (accuracy lost, 1
point) at ``1 - 0.05 / k`` for k = 1 (what ``eek fit`` certified: a check that the call is the fit's), 2 and 3, and its
point replayed on the test rows. For each subset of k seeds the choice is the fit with the fewest certified layers;
the report gives the test layers of every choice, and their mean over the subsets beside one fit's. Command (2 cores,
alone)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/seed_choice_study.py --seeds 0 1 2 --threads 2 \\
        --output benchmarks/results/amd_epyc/seed_choice_study_rt_cpu.json

``--tries-fit K`` also runs what ships from the study on each run of K consecutive seeds of ``--seeds``, ``eek fit ...
--seed FIRST --tries K`` (each try fitted anew, its path chosen at the share, :mod:`earlyexit_kernels.training.fit_tries`),
and replays the folder it writes on the test rows, beside the study's choice among the same seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

BUDGET = 0.01
ALPHA = 0.05


def fit(demo: Path, folder: Path, seed: int, threads: int, tries: int = 1) -> float | None:
    """``eek fit`` at ``seed`` (``tries`` of them from there) into ``folder`` (its wall seconds), or None where the
    folder holds a fit already."""
    if (folder / "eek_fit.json").exists():
        return None
    argv = [sys.executable, "-m", "earlyexit_kernels", "fit", str(demo / "model"), str(demo / "train.csv"), str(folder)]
    argv += ["--calibration", str(demo / "validation.csv"), "--seed", str(seed), "--max-length", "128"]
    argv += ["--threads", str(threads), "--no-progress", "--tries", str(tries)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eek fit failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def certified_at(folder: Path, demo: Path, ks: list[int]) -> dict:
    """The folder's saved path certified on the calibration rows at ``1 - ALPHA / k`` for each k, replayed on test."""
    import torch
    from transformers import AutoTokenizer

    import earlyexit_kernels as eek
    from earlyexit_kernels.calibration.certify import certify
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.calibration.row_losses import row_losses
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.methods.policy_spec import parse_policy
    from earlyexit_kernels.training.calibrate_model import record_exits
    from earlyexit_kernels.training.labelled_texts import encode, label_ids, length_sorted_batches

    model = eek.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved = json.loads((folder / "eek_fit.json").read_text())
    path = [parse_policy(code) for code in saved["certified_path"]]
    records = {}
    for name in ("validation", "test"):
        rows = read_labelled(str(demo / f"{name}.csv"), label_required=True)
        with torch.no_grad():
            records[name] = record_exits(
                model, length_sorted_batches(encode(tokenizer, rows, 128), label_ids(rows, model.config), 64)
            )
    out = {"fit_certified_layers": saved["mean_layers"], "path": (saved.get("certificate") or {}).get("path")}
    for k in ks:
        chosen, _, _ = certify(records["validation"], BUDGET, 1 - ALPHA / k, candidates=path, order_seed=0)
        on_test = replay(chosen.policy, records["test"])
        lost = float(row_losses(on_test.logits, records["test"], "accuracy").double().mean())
        out[f"k{k}"] = {
            "confidence": 1 - ALPHA / k,
            "certified_layers": chosen.mean_layers,
            "test_layers": on_test.layers_run.float().mean().item(),
            "test_accuracy_lost_points": 100 * lost,
        }
    return out


def on_test(folder: Path, demo: Path) -> dict:
    """The folder's policy, as saved, on the test rows: mean layers and accuracy lost against the full model."""
    import torch
    from transformers import AutoTokenizer

    import earlyexit_kernels as eek
    from earlyexit_kernels.calibration.record import replay
    from earlyexit_kernels.calibration.row_losses import row_losses
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.training.calibrate_model import record_exits
    from earlyexit_kernels.training.labelled_texts import encode, label_ids, length_sorted_batches

    model = eek.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = read_labelled(str(demo / "test.csv"), label_required=True)
    with torch.no_grad():
        record = record_exits(
            model, length_sorted_batches(encode(tokenizer, rows, 128), label_ids(rows, model.config), 64)
        )
    out = replay(eek.policy_of(model), record)
    lost = float(row_losses(out.logits, record, "accuracy").double().mean())
    return {"test_layers": out.layers_run.float().mean().item(), "test_accuracy_lost_points": 100 * lost}


def tries_fit(args, seeds: list[int], choices: list[dict]) -> dict:
    """``eek fit --seed FIRST --tries K`` over ``seeds`` (consecutive), its folder on the test rows, and the study's
    choice among the same seeds beside it."""
    first, k = seeds[0], len(seeds)
    folder = args.work / f"tries{k}_seed{first}"
    seconds = fit(args.demo, folder, first, args.threads, tries=k)
    saved = json.loads((folder / "eek_fit.json").read_text())
    return {
        "command": f"eek fit MODEL train.csv OUT --calibration validation.csv --max-length 128 --seed {first} --tries {k}",
        "folder": str(folder),
        "fit_seconds": seconds,
        "tries": saved["tries"],
        "certified_layers": saved["mean_layers"],
        "certificate_confidence": saved["certificate"]["confidence"],
        "chosen_among": saved["certificate"].get("chosen_among"),
        **on_test(folder, args.demo),
        "study_choice": next(c for c in choices if c["seeds"] == seeds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path(".cache/demo"), help="make demo's folder (model, csv files)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/seed_choice_study"), help="the fits' folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--tries-fit", type=int, default=0, metavar="K", help="also run eek fit --tries K on each K consecutive seeds"
    )
    args = parser.parse_args()
    if len(set(args.seeds)) < 2:
        parser.error("--seeds: give at least two different seeds to choose among")
    groups = [args.seeds[i : i + args.tries_fit] for i in range(0, len(args.seeds), args.tries_fit or len(args.seeds))]
    if args.tries_fit and any(g != list(range(g[0], g[0] + args.tries_fit)) for g in groups):
        parser.error("--tries-fit K: eek fit --tries K fits K consecutive seeds; give --seeds such as 3 4 5 6 7 8")
    import torch

    from earlyexit_kernels.bench.results import cpu_name

    torch.set_num_threads(args.threads)
    ks = list(range(1, len(args.seeds) + 1))
    fits = {}
    for seed in args.seeds:
        folder = args.work / f"seed{seed}"
        seconds = fit(args.demo, folder, seed, args.threads)
        fits[seed] = {"folder": str(folder), "fit_seconds": seconds, **certified_at(folder, args.demo, ks)}
        print(seed, json.dumps(fits[seed]), file=sys.stderr, flush=True)
    choices = []
    for k in ks:
        for subset in itertools.combinations(args.seeds, k):
            best = min(subset, key=lambda s: fits[s][f"k{k}"]["certified_layers"])
            choices.append({"seeds": list(subset), "chosen": best, **fits[best][f"k{k}"]})
    mean_test = {
        k: sum(c["test_layers"] for c in choices if len(c["seeds"]) == k) / sum(len(c["seeds"]) == k for c in choices)
        for k in ks
    }
    record = {
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_name(),
        "budget": BUDGET,
        "alpha": ALPHA,
        "fits": fits,
        "choices": choices,
        "mean_test_layers_by_k": mean_test,
    }
    if args.tries_fit:
        record["tries_fits"] = [tries_fit(args, group, choices) for group in groups]
    text = json.dumps(record, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
