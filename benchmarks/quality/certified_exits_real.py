"""What ``eek fit``'s defaults certify on the real tasks, against what the same heads could do (issue 52).

For each task, the classifier fine-tuned on the task's train split (cached, ``make demo``'s
recipe) is given to :func:`earlyexit_kernels.training.fit_texts.fit_model` with ``eek fit``'s
defaults (heads recipe, pooling and form ``auto``, 1 point, 95%) and the rows a careful user has:

- ``train + validation file``: TRAIN_FILE is the train split (the classifier's own fine-tuning
  rows), ``--calibration`` its validation split (rows it never saw);
- ``train only``: TRAIN_FILE alone, the calibration share measured on it.

Then, on the test split (never seen by the classifier, the heads or the calibration), with the
certified risk (accuracy lost against the full model; the test split has labels):

- ``certified``: the mean layers and the loss of the certified policy;
- ``path oracle``: the fewest mean layers of the path ``eek fit`` walked whose loss on test is
  within the budget (the best that path could do there; no usable calibration);
- ``global oracle``: the same for the global entropy grid (one threshold for every layer);
- ``per-row oracle``: each row leaves at the first layer from which every head agrees with the
  final classifier (the heads' ceiling for any rule that reads only their answers).

    .venv/bin/python benchmarks/quality/certified_exits_real.py --output benchmarks/results/certified_exits_real_cpu.json \\
        --readme docs/benchmarks.md
    .venv/bin/python benchmarks/quality/certified_exits_real.py --from-json benchmarks/results/certified_exits_real_cpu.json \\
        --readme docs/benchmarks.md

``--from-folder FOLDER --backbones B --tasks T`` reads the first setting's row from a folder that
``eek fit PLAIN train.csv FOLDER --calibration validation.csv`` already wrote (the serving
benchmark's, for one) instead of fitting again, and adds it to ``--output``'s runs;
``--setting S --backbones B --tasks T`` measures that one row again and puts it in its place.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench.script_results import run_conditions, write_json, write_section
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.losses import row_losses
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.methods.policy_spec import parse_policy
from earlyexit_kernels.training.fit_texts import FitError, fit_model
from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches, split_rows
from earlyexit_kernels.training.record_exits import record_exits

START, END = "<!-- certified-exits-real:start -->", "<!-- certified-exits-real:end -->"
BUDGET_POINTS, CONFIDENCE = 1.0, 0.95
SETTINGS = ("train + validation file", "train only")
TASK_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "debates": "the 2016 debates (three classes)"}
BACKBONE_NAMES = {"minilm": "MiniLM-L6", "mpnet": "MPNet-base"}
SCRIPT = "benchmarks/quality/certified_exits_real.py"


def _rows(split, name: str) -> LabelledTexts:
    return LabelledTexts(list(split.texts), None, list(split.labels), name, "label")


def per_row_oracle(record) -> float:
    """Mean over rows of the first layer from which every head's class is the final classifier's."""
    classes = record.all_logits.float().argmax(-1)  # [L, N]
    agrees = classes == classes[-1]
    # from layer k on every head agrees: the suffix of the agreement, read from the last layer back
    suffix = torch.flip(torch.cummin(torch.flip(agrees.int(), [0]), 0).values, [0]).bool()
    first = suffix.int().argmax(0) + 1
    return float(first.double().mean())


def _oracle(candidates, record, budget: float) -> float:
    """The fewest mean layers among ``candidates`` whose accuracy loss on ``record`` is within ``budget``."""
    best = float(record.num_layers)
    for policy in candidates:
        out = replay(policy, record)
        if float(row_losses(out.logits, record, "accuracy").mean()) <= budget + 1e-12:
            best = min(best, out.layers_run.float().mean().item())
    return best


def run_one(backbone: str, task: str, setting: str, seed: int) -> dict:
    model, tokenizer, info = real_task.fine_tuned_model(backbone, task=task, progress=False)
    splits = real_task.load_task(task)
    train = _rows(splits["train"], "train split")
    rest, held = split_rows(len(train), 0.1, seed)  # eek fit's --validation-split 0.1 of TRAIN_FILE
    train, validation = train.subset(rest), train.subset(held)
    calibration = _rows(splits["validation"], "validation split") if setting == SETTINGS[0] else None
    row = {"backbone": backbone, "task": task, "setting": setting, "seed": seed}
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fit_model(
                model,
                tokenizer,
                train,
                validation,
                max_drop=BUDGET_POINTS,
                confidence=CONFIDENCE,
                calibration=calibration,
                validation_split=0.1,
                seed=seed,
            )
    except FitError as error:
        return {**row, "error": str(error), "seconds": round(time.perf_counter() - started, 1)}
    certificate = report.certificate or {}
    return {
        **row,
        "seconds": round(time.perf_counter() - started, 1),
        "train_rows": report.train_rows,
        "calibration_rows": report.calibration_rows,
        "calibration_share": report.calibration_share,
        "path": certificate.get("path"),
        "path_layers_validation": certificate.get("path_layers"),
        "policy": report.policy,
        "certified_layers_calibration": report.mean_layers,
        "uncertified_layers_calibration": certificate.get("uncertified_layers"),
        "more_rows": certificate.get("more_rows"),
        "more_rows_layers": certificate.get("more_rows_layers"),
        "bound": certificate.get("bound"),
        **_test_columns(model, tokenizer, task, eek.policy_of(model), report.certified_path),
        "warnings": report.warnings,
        "fine_tuned": info["path"].split("/")[-1],
    }


def _test_columns(model, tokenizer, task: str, chosen, path_codes, record_policy=None) -> dict:
    """The test split's columns of a row: certified layers and loss, the oracles."""
    splits = real_task.load_task(task)
    test = _rows(splits["test"], "test split")
    ids = torch.tensor([int(y) for y in test.labels])
    with torch.no_grad():
        record = record_exits(model, length_sorted_batches(encode(tokenizer, test, 128), ids, 64))
    out = replay(chosen, record)
    budget = BUDGET_POINTS / 100
    path = [parse_policy(code) for code in path_codes] or [chosen]
    grid = certified_candidates(eek.Entropy(0.0), record.num_layers, record.all_logits.shape[-1])
    return {
        "num_layers": record.num_layers,
        "test_rows": int(ids.numel()),
        "full_test_accuracy": float((record.all_logits[-1].argmax(-1) == record.labels).double().mean()),
        "certified_test_layers": out.layers_run.float().mean().item(),
        "certified_test_loss_points": 100 * float(row_losses(out.logits, record, "accuracy").mean()),
        "path_oracle_test_layers": _oracle(path, record, budget),
        "global_oracle_test_layers": _oracle(grid, record, budget),
        "per_row_oracle_test_layers": per_row_oracle(record),
    }


def run_folder(folder: Path, backbone: str, task: str) -> dict:
    """The first setting's row from ``folder``, written by ``eek fit PLAIN train.csv FOLDER
    --calibration validation.csv``: its certificate from ``eek_fit.json``, the test columns anew."""
    from transformers import AutoTokenizer

    from earlyexit_kernels.patching.fit_record import FitRecord

    report = FitRecord.load(folder).report
    if "--calibration" not in (report.get("calibration_source") or ""):
        raise SystemExit(f"error: {folder} was not certified on a --calibration file (the first setting)")
    model = eek.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    certificate = report.get("certificate") or {}
    return {
        "backbone": backbone,
        "task": task,
        "setting": SETTINGS[0],
        "folder": str(folder),
        "seconds": round(report["train_seconds"] + report["calibrate_seconds"], 1),
        "train_rows": report["train_rows"],
        "calibration_rows": report["calibration_rows"],
        "calibration_share": report.get("calibration_share"),
        "path": certificate.get("path"),
        "path_layers_validation": certificate.get("path_layers"),
        "policy": report["policy"],
        "certified_layers_calibration": report["mean_layers"],
        "uncertified_layers_calibration": certificate.get("uncertified_layers"),
        "more_rows": certificate.get("more_rows"),
        "more_rows_layers": certificate.get("more_rows_layers"),
        "bound": certificate.get("bound"),
        **_test_columns(model, tokenizer, task, eek.policy_of(model), report.get("certified_path") or []),
        "warnings": report.get("warnings", []),
        "fine_tuned": Path(report["source_model"]).name,
    }


def render(results: dict) -> str:
    lines = [
        START,
        f"Measured {results['date']} on {results['cpu']} ({results['command']}, {results['seconds']:.0f} s). "
        f"Budget {BUDGET_POINTS:g} point of accuracy lost against the full model, confidence "
        f"{100 * CONFIDENCE:g}%; `eek fit`'s defaults otherwise. Mean layers on the test split.",
        "",
        "| model, task | rows given to `eek fit` | train / certify rows | path | certified (test loss) | path oracle "
        "| global oracle | per-row oracle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        name = f"{BACKBONE_NAMES[r['backbone']]}, {TASK_NAMES[r['task']]}"
        if "error" in r:
            lines.append(f"| {name} | {r['setting']} | cannot certify: {r['error'].split(':')[0]} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['setting']} | {r['train_rows']:,} / {r['calibration_rows']:,} | "
            f"{(r['path'] or 'global').replace('_', '-')} | {r['certified_test_layers']:.2f} of {r['num_layers']} "
            f"({r['certified_test_loss_points']:+.2f}) | {r['path_oracle_test_layers']:.2f} | "
            f"{r['global_oracle_test_layers']:.2f} | {r['per_row_oracle_test_layers']:.2f} |"
        )
    for added in results.get("added", []):
        lines += ["", f"Row {added['row']}: added {added['date']} on {added['cpu']} (`{added['command']}`)."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="minilm", help="comma-separated: minilm, mpnet")
    parser.add_argument("--tasks", default="rotten_tomatoes,debates", help="comma-separated: rotten_tomatoes, debates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--from-json", type=Path)
    parser.add_argument("--from-folder", type=Path, help="the first setting's row from this eek fit folder")
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        help="measure this one row again (--backbones and --tasks name one each) and put it in --output's runs",
    )
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    elif args.from_folder or args.setting:
        if args.output is None or not args.output.is_file():
            raise SystemExit(
                "error: --from-folder and --setting add a row to --output's recorded runs; give an existing --output"
            )
        results = json.loads(args.output.read_text())
        started = time.perf_counter()
        if args.from_folder:
            row = run_folder(args.from_folder, args.backbones, args.tasks)
        else:
            row = run_one(args.backbones, args.tasks, args.setting, args.seed)
        print(json.dumps(row), flush=True)
        key = (row["backbone"], row["task"], row["setting"])
        keys = [(r["backbone"], r["task"], r["setting"]) for r in results["runs"]]
        if key in keys:  # measured again: in its place
            results["runs"][keys.index(key)] = row
        else:
            results["runs"].append(row)
        name = f"{BACKBONE_NAMES[row['backbone']]}, {TASK_NAMES[row['task']]}, {row['setting']}"
        results.setdefault("added", []).append({**run_conditions(SCRIPT, argv, started), "row": name})
        write_json(args.output, results)
    else:
        started = time.perf_counter()
        runs = []
        for backbone in args.backbones.split(","):
            for task in args.tasks.split(","):
                if backbone == "mpnet" and task != "rotten_tomatoes":
                    continue
                for setting in SETTINGS:
                    runs.append(run_one(backbone, task, setting, args.seed))
                    print(json.dumps(runs[-1]), flush=True)
        results = {**run_conditions(SCRIPT, argv, started), "runs": runs}
        if args.output:
            write_json(args.output, results)
    print(render(results))
    if args.readme:
        write_section(args.readme, START, END, render(results), "Certified exits on the real tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
