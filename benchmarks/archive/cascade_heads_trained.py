"""The shipped cascade heads (``head="cascade"``) trained three ways by the package's trainer, against the MLP heads.

Finished investigation (issue 62): on MiniLM-L6 / Rotten Tomatoes the forms lie within 0.1 layers of
each other on the test split's global oracle (docs/benchmarks.md, "Heads that read the head below").

The probe's cached vectors (``cascade_heads_probe.py``: ``make demo``'s MiniLM-L6, mean-pooled
token vectors of layers 1-5, the final logits and labels of the train, validation and test splits).
The heads are the package's (``eek.patch(..., pooling="mean", head=...)``), trained by
``train_exit_heads`` on the cached train rows with the ``deebert`` loss, early-stopped on the
validation rows:

- ``mlp``: MLP heads;
- ``cascade, maps alone``: those MLP heads, then only the maps of the head below (``trains="below"``,
  what ``eek fit``'s automatic choice trains);
- ``cascade, all from the MLP heads``: those MLP heads, then every parameter;
- ``cascade, fresh``: cascade heads trained from fresh heads (``--head cascade``).

Per form: the mean layers at 1 point on the validation rows (``calibrate``, uncertified: what the
automatic choice compares), the test split's global oracle (the fewest mean layers of the global
entropy grid within 1 point on test), the per-row oracle and the heads' test accuracy.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/cascade_heads_trained.py \\
        --output benchmarks/results/amd_epyc/cascade_heads_trained_cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.script_results import run_conditions
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.training.cached_heads import ExitInputCache, cached_record
from earlyexit_kernels.training.calibrate_model import calibrate
from earlyexit_kernels.training.train import train_exit_heads

sys.path.insert(0, str(Path(__file__).parent))  # cascade_heads_probe, archived beside it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))  # certified_exits_real
from cascade_heads_probe import cached_vectors  # noqa: E402
from certified_exits_real import _oracle, per_row_oracle  # noqa: E402

BUDGET = 0.01
SCRIPT = "benchmarks/archive/cascade_heads_trained.py"


def _cache(data: dict, split: str) -> ExitInputCache:
    vectors, final, labels = data[split]
    inputs = torch.cat([vectors, torch.zeros_like(vectors[:, :1])], 1)  # layer L reads the cached final logits
    return ExitInputCache(inputs, None, final, labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/probe/minilm_rt_mean_vectors.pt"))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    data = cached_vectors(args.cache)
    train, val, test = (_cache(data, split) for split in ("train", "validation", "test"))
    model, _, _ = real_task.fine_tuned_minilm(progress=False)
    eek.patch(model, eek.Entropy(0.0), "torch", pooling="mean", head="mlp")
    num_layers, num_labels = train.num_layers, data["train"][1].shape[-1]
    grid = certified_candidates(eek.Entropy(0.0), num_layers, num_labels)

    def fit(trains=None):
        return train_exit_heads(model, train, method="deebert", trains=trains, val_batches=val, progress=False)

    def row(name: str, seconds: float) -> str:
        model.eval()
        chosen = calibrate(cached_record(model, val), max_drop=100 * BUDGET, target="accuracy", min_saving=0.0)
        record = cached_record(model, test)
        accuracy = [(record.all_logits[i].argmax(-1) == record.labels).double().mean().item() for i in range(5)]
        line = (
            f"| {name} | {chosen.mean_layers:.3f} | {_oracle(grid, record, BUDGET):.2f} | {per_row_oracle(record):.2f} "
            f"| {', '.join(f'{100 * a:.1f}' for a in accuracy)} | {seconds:.0f} |"
        )
        print(line, flush=True)
        return line

    lines = []
    t0 = time.perf_counter()
    fit()
    lines.append(row("mlp", time.perf_counter() - t0))
    mlp = {k: v.clone() for k, v in model.early_exit_heads.classifiers.state_dict().items()}
    for name, start, trains in (
        ("cascade, maps alone (`eek fit`'s choice)", mlp, "below"),
        ("cascade, all from the MLP heads", mlp, None),
        ("cascade, fresh (`--head cascade`)", None, None),
    ):
        eek.patch(model, eek.Entropy(0.0), "torch", head="cascade")
        model.early_exit_heads.set_form("cascade", None, model.classifier)  # fresh heads
        if start is not None:
            model.early_exit_heads.classifiers.load_state_dict(start, strict=False)
        t0 = time.perf_counter()
        fit(trains)
        lines.append(row(name, time.perf_counter() - t0))
    conditions = run_conditions(SCRIPT, argv, started)
    text = "\n".join(
        [
            "# The shipped cascade heads, trained three ways, against the MLP heads (MiniLM-L6, Rotten Tomatoes)",
            "",
            f"`python {SCRIPT}`; {conditions['date']}, {conditions['cpu']}, torch {conditions['torch']}, "
            f"{conditions['seconds']:.0f} s. Budget 1 point of accuracy lost against the full model; "
            f"{train.num_rows} train, {val.num_rows} validation, {test.num_rows} test rows; layers of {num_layers}.",
            "",
            "| heads | validation layers at the budget | test global oracle | test per-row oracle "
            "| heads' test accuracy, layers 1-5 (%) | training (s) |",
            "| --- | --- | --- | --- | --- | --- |",
            *lines,
            "",
        ]
    )
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
