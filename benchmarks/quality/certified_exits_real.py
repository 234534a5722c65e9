"""What ``eek fit``'s defaults certify on the real tasks, against what the same heads could do (issue 52).

For each task, the classifier fine-tuned on the task's train split (cached, ``make demo``'s
recipe) is given to :func:`earlyexit_kernels.training.fit_texts.fit_model` with ``eek fit``'s
defaults (heads recipe, pooling and form ``auto``, 1 point, 95%) and the rows a careful user has:

- ``train + validation file``: TRAIN_FILE is the train split (the classifier's own fine-tuning
  rows), ``--calibration`` its validation split (rows it never saw);
- ``train only``: TRAIN_FILE alone, the calibration share measured on it;
- Rotten Tomatoes only, a classifier fine-tuned (the same recipe, cached apart) on the first
  6,000 rows of the train split, so that the other 2,808 stay unseen (issue 62 item 3).
  TRAIN_FILE is those 6,000 rows, ``--calibration`` the validation split, and the certificate
  is measured twice: ``6,000 fine-tuning rows + validation file`` without the unseen rows, and
  ``... + unseen unlabelled rows`` with them given as ``unlabelled=`` (``--unlabelled``: their
  labels dropped, prediction-powered inference in the accuracy-lost certificate).

Then, on the test split (never seen by the classifier, the heads or the calibration), with the
certified risk (accuracy lost against the full model; the test split has labels):

- ``certified``: the mean layers and the loss of the certified policy;
- ``path oracle``: the fewest mean layers of the path ``eek fit`` walked whose loss on test is
  within the budget (the best that path could do there; no usable calibration);
- ``global oracle``: the same for the global entropy grid (one threshold for every layer);
- ``per-row oracle``: each row leaves at the first layer from which every head agrees with the
  final classifier (the heads' ceiling for any rule that reads only their answers);
- ``price``: certified minus path oracle, what the certificate costs on that path.

    .venv/bin/python benchmarks/quality/certified_exits_real.py --output benchmarks/results/intel_xeon/certified_exits_real_cpu.json \\
        --readme docs/benchmarks.md
    .venv/bin/python benchmarks/quality/certified_exits_real.py --from-json benchmarks/results/intel_xeon/certified_exits_real_cpu.json \\
        --readme docs/benchmarks.md

``--from-folder FOLDER --backbones B --tasks T`` reads the first setting's row from a folder that
``eek fit PLAIN train.csv FOLDER --calibration validation.csv`` already wrote (the serving
benchmark's, for one) instead of fitting again, and adds it to ``--output``'s runs;
``--setting S --backbones B --tasks T`` measures that one row again and puts it in its place
(``--setting`` again for more rows: the two rows with a 6,000-row fine-tuning, for one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.script_results import run_conditions, write_json, write_section
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.methods.policy_spec import parse_policy
from earlyexit_kernels.training.calibrate_model import record_exits
from earlyexit_kernels.training.fit_texts import FitError, fit_model
from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches, split_rows

START, END = "<!-- certified-exits-real:start -->", "<!-- certified-exits-real:end -->"
BUDGET_POINTS, CONFIDENCE = 1.0, 0.95
#: how many train rows the classifier of the last two settings is fine-tuned on (the others stay unseen)
FINE_TUNING_ROWS = 6000
SUBSET_SETTINGS = (
    f"{FINE_TUNING_ROWS:,} fine-tuning rows + validation file",
    f"{FINE_TUNING_ROWS:,} fine-tuning rows + validation file + unseen unlabelled rows",
)
SETTINGS = ("train + validation file", "train only", *SUBSET_SETTINGS)
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


def applies(task: str, setting: str) -> bool:
    """Whether ``setting`` is measured on ``task``: the 6,000-row fine-tuning needs Rotten Tomatoes' 8,808 train rows."""
    return setting not in SUBSET_SETTINGS or task == "rotten_tomatoes"


def fit_as_eek_fit(model, tokenizer, train, validation, calibration, seed: int, **options):
    """:func:`~earlyexit_kernels.training.fit_texts.fit_model` as ``eek fit`` runs it with its defaults here (1 point,
    95%, ``--validation-split 0.1``), its warnings silenced; ``options``: the row's other settings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_model(
            model,
            tokenizer,
            train,
            validation,
            max_drop=BUDGET_POINTS,
            confidence=CONFIDENCE,
            calibration=calibration,
            validation_split=0.1,
            seed=seed,
            **options,
        )


def run_one(backbone: str, task: str, setting: str, seed: int, head: str = "auto", guarantee: str = "probable") -> dict:
    if not applies(task, setting):
        raise SystemExit(f"error: the setting {setting!r} is measured on rotten_tomatoes only, not on {task}")
    subset = FINE_TUNING_ROWS if setting in SUBSET_SETTINGS else None
    # progress lines: a fine-tuning not cached yet takes tens of minutes on a CPU
    model, tokenizer, info = real_task.fine_tuned_model(backbone, task=task, progress="lines", train_rows=subset)
    splits = real_task.load_task(task)
    seen, unseen = real_task.train_subset(splits["train"], subset)
    train = _rows(seen, "train split" if subset is None else f"first {subset:,} train rows")
    rest, held = split_rows(len(train), 0.1, seed)  # eek fit's --validation-split 0.1 of TRAIN_FILE
    train, validation = train.subset(rest), train.subset(held)
    calibration = _rows(splits["validation"], "validation split") if setting != SETTINGS[1] else None
    # the unseen train rows without their labels, as a user's traffic would come
    unlabelled = (
        LabelledTexts(list(unseen.texts), None, None, "unseen train rows") if setting == SUBSET_SETTINGS[1] else None
    )
    row = {"backbone": backbone, "task": task, "setting": setting, "seed": seed}
    if head != "auto":  # a form forced (the auto choice's rows carry no key: as they were recorded)
        row["head_asked"] = head
    if guarantee != "probable":  # the rows recorded before there was a choice carry no key: probable
        row["guarantee"] = guarantee
    if subset is not None:  # how long the fine-tuning took (0 when the cache had it), on a shared machine
        row.update(fine_tuning_rows=len(seen), fine_tuning_seconds=round(info["seconds"], 1))
    started = time.perf_counter()
    try:
        report = fit_as_eek_fit(
            model,
            tokenizer,
            train,
            validation,
            calibration,
            seed,
            unlabelled=unlabelled,
            head=head,
            guarantee=guarantee,
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
        "heads": f"{report.pooling}, {report.head}",
        "head_trials": [
            (t["pooling"], t["head"], round(t["mean_layers"], 3), round(t["seconds"], 1)) for t in report.head_trials
        ],
        "certified_layers_calibration": report.mean_layers,
        "uncertified_layers_calibration": certificate.get("uncertified_layers"),
        "more_rows": certificate.get("more_rows"),
        "more_rows_layers": certificate.get("more_rows_layers"),
        "bound": certificate.get("bound"),
        "unlabelled_rows": certificate.get("unlabelled_rows"),
        "unlabelled_use": certificate.get("unlabelled_use"),
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
    losses = row_losses(out.logits, record, "accuracy").double()
    budget = BUDGET_POINTS / 100
    path = [parse_policy(code) for code in path_codes] or [chosen]
    grid = certified_candidates(eek.Entropy(0.0), record.num_layers, record.all_logits.shape[-1])
    certified, path_oracle = out.layers_run.float().mean().item(), _oracle(path, record, budget)
    return {
        "num_layers": record.num_layers,
        "test_rows": int(ids.numel()),
        "full_test_accuracy": float((record.all_logits[-1].argmax(-1) == record.labels).double().mean()),
        "certified_test_layers": certified,
        "certified_test_loss_points": 100 * float(losses.mean()),
        # the test split's own noise on that loss: its discordant rows, and the mean's standard error
        "certified_test_discordant": float((losses != 0).double().mean()),
        "certified_test_loss_se_points": 100 * float(losses.std() / losses.numel() ** 0.5),
        "path_oracle_test_layers": path_oracle,
        "price_test_layers": certified - path_oracle,
        "global_oracle_test_layers": _oracle(grid, record, budget),
        "per_row_oracle_test_layers": per_row_oracle(record),
    }


def saved_fit(folder: Path):
    """The :class:`~earlyexit_kernels.patching.fit_record.FitRecord` of ``folder``, refused (``SystemExit``) unless it
    was certified on a ``--calibration`` file or by ``eek calibrate`` (the first setting's rows)."""
    from earlyexit_kernels.patching.fit_record import FitRecord

    saved = FitRecord.load(folder)
    source = saved.report.get("calibration_source") or ""
    if "--calibration" not in source and "eek calibrate" not in source:
        raise SystemExit(
            f"error: {folder} was not certified on a --calibration file or by eek calibrate (the first setting)"
        )
    return saved


def run_folder(folder: Path, backbone: str, task: str, setting: str | None = None) -> dict:
    """The first setting's row from ``folder``, written by ``eek fit PLAIN train.csv FOLDER
    --calibration validation.csv`` (and perhaps certified anew by ``eek calibrate FOLDER validation.csv``): its
    certificate from ``eek_fit.json``, the test columns anew. ``setting``: what the rows given were, where they
    were not the first setting's (a classifier fine-tuned on fewer rows, say)."""
    from transformers import AutoTokenizer

    saved = saved_fit(folder)
    report = saved.report
    model = eek.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    certificate = report.get("certificate") or {}
    guarantee = (
        {"guarantee": certificate["guarantee"]} if certificate.get("guarantee", "probable") != "probable" else {}
    )
    return {
        "backbone": backbone,
        "task": task,
        "setting": setting or SETTINGS[0],
        **guarantee,
        "folder": str(folder),
        "seconds": round(report["train_seconds"] + report["calibrate_seconds"], 1),
        "train_rows": report["train_rows"],
        "calibration_rows": report["calibration_rows"],
        "calibration_share": report.get("calibration_share"),
        "path": certificate.get("path"),
        "path_layers_validation": certificate.get("path_layers"),
        "policy": report["policy"],
        "heads": f"{report.get('pooling')}, {report.get('head')}",
        "certified_layers_calibration": report["mean_layers"],
        "uncertified_layers_calibration": certificate.get("uncertified_layers"),
        "more_rows": certificate.get("more_rows"),
        "more_rows_layers": certificate.get("more_rows_layers"),
        "bound": certificate.get("bound"),
        **_test_columns(model, tokenizer, task, eek.policy_of(model), report.get("certified_path") or []),
        "warnings": report.get("warnings", []),
        "fine_tuned": Path(saved.source_model or "").name,
    }


def render(results: dict) -> str:
    lines = [
        START,
        f"Measured {results['date']} on {results['cpu']} ({results['command']}, {results['seconds']:.0f} s). "
        f"Budget {BUDGET_POINTS:g} point of accuracy lost against the full model, confidence "
        f"{100 * CONFIDENCE:g}%; `eek fit`'s defaults otherwise. Mean layers on the test split; "
        "price: certified minus path oracle. The seconds are those of a shared machine.",
        "",
        "| model, task | rows given to `eek fit` | train / certify rows | heads | path | guarantee "
        "| certified (test loss) | path oracle | price | global oracle | per-row oracle |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        name = f"{BACKBONE_NAMES[r['backbone']]}, {TASK_NAMES[r['task']]}"
        if "error" in r:
            lines.append(f"| {name} | {r['setting']} | cannot certify: {r['error'].split(':')[0]} | | | | | | | | |")
            continue
        unlabelled = ""
        if r.get("unlabelled_rows"):  # the fit keeps them out where they certify no fewer layers on validation
            used = "" if r.get("unlabelled_use") == "powered" else ", not used"
            unlabelled = f" + {r['unlabelled_rows']:,} unlabelled{used}"
        price = r["certified_test_layers"] - r["path_oracle_test_layers"]
        heads = r.get("heads", "not recorded")
        heads = f"{heads} (asked)" if r.get("head_asked") else heads
        lines.append(
            f"| {name} | {r['setting']} | {r['train_rows']:,} / {r['calibration_rows']:,}{unlabelled} | {heads} | "
            f"{(r['path'] or 'global').replace('_', '-')} | {r.get('guarantee', 'probable')} | "
            f"{r['certified_test_layers']:.2f} of {r['num_layers']} "
            f"({r['certified_test_loss_points']:+.2f}) | {r['path_oracle_test_layers']:.2f} | {price:+.2f} | "
            f"{r['global_oracle_test_layers']:.2f} | {r['per_row_oracle_test_layers']:.2f} |"
        )
    # each row's latest measurement (the file keeps every one, in order; a row measured again replaced its run)
    latest = {added["row"]: added for added in results.get("added", [])}
    for added in results.get("added", []):
        if latest[added["row"]] is added:
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
        action="append",
        help="measure this row again (--backbones and --tasks name one each) and put it in --output's runs; "
        "give it again for more rows",
    )
    parser.add_argument(
        "--head",
        default="auto",
        choices=("auto", "model", "mlp", "cascade"),
        help="the heads' form eek fit is given (--setting rows only; default: auto, eek fit's default)",
    )
    parser.add_argument(
        "--guarantee",
        default="probable",
        choices=("probable", "expected"),
        help="the guarantee eek fit certifies (--setting rows only; a --from-folder row reads its folder's)",
    )
    parser.add_argument(
        "--folder-setting",
        help="what the rows given to the --from-folder folder were, where not the first setting's",
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
        for setting in [None] if args.from_folder else args.setting:
            started = time.perf_counter()
            if args.from_folder:
                row = run_folder(args.from_folder, args.backbones, args.tasks, args.folder_setting)
            else:
                row = run_one(args.backbones, args.tasks, setting, args.seed, args.head, args.guarantee)
            print(json.dumps(row), flush=True)
            key = (row["backbone"], row["task"], row["setting"], row.get("head_asked"), row.get("guarantee"))
            keys = [
                (r["backbone"], r["task"], r["setting"], r.get("head_asked"), r.get("guarantee"))
                for r in results["runs"]
            ]
            if key in keys:  # measured again: in its place
                results["runs"][keys.index(key)] = row
            else:
                results["runs"].append(row)
            name = f"{BACKBONE_NAMES[row['backbone']]}, {TASK_NAMES[row['task']]}, {row['setting']}"
            name += f", head {row['head_asked']}" if row.get("head_asked") else ""
            name += f", guarantee {row['guarantee']}" if row.get("guarantee") else ""
            results.setdefault("added", []).append({**run_conditions(SCRIPT, argv, started), "row": name})
            write_json(args.output, results)  # each row as it lands
    else:
        started = time.perf_counter()
        runs = []
        for backbone in args.backbones.split(","):
            for task in args.tasks.split(","):
                if backbone == "mpnet" and task != "rotten_tomatoes":
                    continue
                for setting in (s for s in SETTINGS if applies(task, s)):
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
