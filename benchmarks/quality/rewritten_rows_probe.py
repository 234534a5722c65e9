"""Do exit heads trained on rewritten copies of their rows (``eek fit --rewrites N``) certify fewer layers?

A probe for issue 108's targets. Issue 108 asks for a better exit *score*; every score tried ranked the rows within a
layer as the head's entropy does (docs/benchmarks.md, "A probe before it"). What the calibration share's probe showed
instead is that the *heads* are short of rows: on MiniLM-L6 Rotten Tomatoes each doubling of the heads' training rows
from 1,024 to 4,096 saved about 0.2 predicted layers (benchmarks/results/amd_epyc/calibration_share_unlabelled_rt_cpu.md).
``eek fit --rewrites N`` (:mod:`earlyexit_kernels.training.rewritten_rows`) makes more: N rewritten copies of every
training row, labelled by the full model.

For each seed, two fits through ``eek fit``'s command line, as a user runs them, on the same rows, then ``eek
evaluate`` on the test rows:

- ``base``: ``eek fit MODEL train.csv OUT --calibration validation.csv --max-length 128 --seed S``;
- ``rewrites``: the same with ``--rewrites N``.

The seed draws the validation split of train.csv, the heads' initial weights and the copies. Command (``make demo``'s
classifier and splits; 2 cores, alone)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/rewritten_rows_probe.py --threads 2 --rewrites 3 \\
        --seeds 0 1 2 --output benchmarks/results/amd_epyc/rewritten_rows_probe_rt_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.quality

from benchmarks.quality.certified_exits_real import columns_on_test  # noqa: E402
from earlyexit_kernels.bench.results import cpu_name  # noqa: E402


def eek(*arguments: str) -> tuple[str, float]:
    """``eek ARGUMENTS`` in a fresh interpreter: its standard output and wall seconds; a failure stops the probe."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "earlyexit_kernels", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eek {' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout, time.perf_counter() - started


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise SystemExit(f"no {pattern!r} in:\n{text}")
    return float(found.group(1))


def oracles(folder: Path) -> dict:
    """What the folder's heads could do on the test split (``certified_exits_real``'s columns): the fewest mean layers
    within the budget along the path walked (``path oracle``) and along one entropy threshold (``global oracle``), and
    the per-row oracle; less noisy than the certified figure, which moves with the path chosen and its walk."""
    import torch
    from transformers import AutoTokenizer

    import earlyexit_kernels as eek

    model = eek.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    saved = json.loads((folder / "eek_fit.json").read_text())
    with torch.no_grad():
        columns = columns_on_test(model, tokenizer, "rotten_tomatoes", eek.policy_of(model), saved["certified_path"])
    keys = (
        "path_oracle_test_layers",
        "global_oracle_test_layers",
        "per_row_oracle_test_layers",
        "certified_test_layers",
    )
    return {key: columns[key] for key in keys}


def fitted(demo: Path, folder: Path, seed: int, rewrites: int, threads: int, reuse: bool) -> dict:
    """One fit (or, ``reuse``, the one already in ``folder``) and its evaluation on the test rows."""
    common = ["--max-length", "128", "--threads", str(threads), "--no-progress"]
    argv = ["fit", str(demo / "model"), str(demo / "train.csv"), str(folder), "--calibration"]
    argv += [str(demo / "validation.csv"), "--seed", str(seed), "--overwrite", *common]
    if rewrites:
        argv += ["--rewrites", str(rewrites)]
    if reuse and (folder / "eek_fit.json").exists():
        report, fit_seconds = "(reused)", float("nan")
    else:
        report, fit_seconds = eek(*argv)
    evaluation, _ = eek("evaluate", str(folder), str(demo / "test.csv"), *common)
    summary = json.loads((folder / "eek_fit.json").read_text())
    certificate = summary.get("certificate") or {}
    return {
        "command": "eek " + " ".join(argv),
        "fit_seconds": round(fit_seconds, 1),
        "policy": summary["policy"],
        "path": certificate.get("path"),
        "path_layers": certificate.get("path_layers"),
        "certified_layers": summary["mean_layers"],
        "uncertified_layers": certificate.get("uncertified_layers"),
        "head": f"{summary.get('pooling')} {summary.get('head')}",
        "rewritten_rows": summary.get("rewritten_rows", 0),
        "train_rows": summary["train_rows"],
        "test_layers": _number(r"mean layers run: ([0-9.]+) of", evaluation),
        "test_accuracy": _number(r"accuracy: ([0-9.]+)%", evaluation),
        **oracles(folder),
        "report": report.strip().splitlines(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path(".cache/demo"), help="make demo's folder (model, csv files)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rewritten_rows_probe"), help="where the folders go")
    parser.add_argument("--rewrites", type=int, default=3, help="eek fit --rewrites of the second fit (at least 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="eek fit --seed of each pair of fits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="take a fit already in --work instead of fitting again")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.rewrites < 1:
        parser.error("--rewrites must be at least 1: the probe compares it with the fit without")
    full = _number(
        r"accuracy: ([0-9.]+)%",
        eek(
            "evaluate",
            str(args.demo / "model"),
            str(args.demo / "test.csv"),
            "--policy",
            "Entropy(0.0)",
            "--max-length",
            "128",
            "--threads",
            str(args.threads),
            "--no-progress",
        )[0],
    )
    record = {
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "full_model_test_accuracy": full,
        "runs": [],
    }
    for seed in args.seeds:
        for rewrites in (0, args.rewrites):
            run = {"seed": seed, "rewrites": rewrites}
            folder = args.work / f"seed{seed}_rewrites{rewrites}"
            run.update(fitted(args.demo, folder, seed, rewrites, args.threads, args.reuse))
            record["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "report"}), file=sys.stderr, flush=True)
            if args.output:
                args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
