"""The benchmark suite's smoke run: ``eek bench sweep --smoke`` must keep working.

A tiny model and one repetition: this checks the suite runs end to end on every family
(the BERT sweep, the spot rows of ALBERT, RoBERTa, DistilBERT, DeBERTa-v3 and ModernBERT), that every
method agrees with the pattern and the naive baseline (the suite's own ``check``
column), that the CSV has its columns and that the plots and the README section are
produced. It times nothing meaningful.
"""

import csv
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.suite import report  # noqa: E402
from earlyexit_kernels.bench import sweep  # noqa: E402
from earlyexit_kernels.bench.results import COLUMNS, write_csv  # noqa: E402


def test_bench_smoke(tmp_path):
    out = tmp_path / "cpu"
    status = sweep.main(["--smoke", "--device", "cpu", "--output-dir", str(out), "--no-progress"])
    assert status == 0

    with (out / "bench.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    e2e = [r for r in rows if r["kind"] == "e2e"]
    methods = {(r["method"], r["backend"]) for r in e2e}
    assert {("full", "hf"), ("eek", "torch"), ("naive", "torch"), ("bs1", "torch")} <= methods
    assert {r["model"] for r in e2e} == {"bert", "albert", "roberta", "distilbert", "deberta_v3", "modernbert"}
    # Every family runs every method; DeBERTa-v3 runs eager attention (the package's only one for it), the full
    # model too, and the CSV says so.
    for model in ("distilbert", "deberta_v3", "modernbert"):
        mine = [r for r in e2e if r["model"] == model]
        assert {(r["method"], r["backend"]) for r in mine} == methods
        assert {r["pattern"] for r in mine} == {"sched-f0.00", "sched-f0.50", "geometric-p0.10"}
        assert {r["attn"] for r in mine} == {"eager" if model == "deberta_v3" else "sdpa"}
        assert all(r["nonlayer_p50_s"] != "" for r in mine)
    assert {r["pattern"] for r in e2e if r["model"] == "bert"} >= {
        "sched-f0.00",
        "sched-f0.25",
        "sched-f0.50",
        "sched-f0.75",
        "geometric-p0.10",
        "padded-geometric",
    }
    assert all(r["check"] == "ok" for r in e2e)
    for r in e2e:
        assert float(r["t_p50_s"]) > 0 and float(r["ideal_layers"]) >= 1.0
        if r["method"] != "full":
            assert int(r["host_syncs"]) >= 1
    # f is what the pattern saves: sched-f0.50 on the 4-layer smoke model at B = 4 runs 8 of 16 layer evaluations.
    half = next(r for r in e2e if r["pattern"] == "sched-f0.50" and r["B"] == "4")
    assert float(half["f_actual"]) == 0.5 and float(half["ideal_layers"]) == 2.0
    assert {r["kind"] for r in rows} == {"e2e"}  # the microbenchmarks are the repository's (benchmarks/suite/micro.py)

    for name in ("speedup_vs_f.png", "meta.json"):
        assert (out / name).stat().st_size > 0

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\ntext\n")
    assert report.main([str(out / "bench.csv"), "--readme", str(readme)]) == 0
    first = readme.read_text()
    assert first.startswith("# title") and report.START in first and report.END in first
    assert "| bert | 16 | 4 |" in first
    assert "| deberta_v3 (eager attention) | 16 | 4 |" in first and "| modernbert | 16 | 4 |" in first
    assert "Speed-up over the full model, deberta_v3 (eager attention), S = 16:" in first
    assert report.main([str(out / "bench.csv"), "--readme", str(readme)]) == 0
    assert readme.read_text().count(report.START) == 1

    # Two CSVs of one machine (the sweep and the families, as committed): one section, each CSV's settings.
    sweep_csv, families = tmp_path / "sweep_csv" / "bench.csv", tmp_path / "families" / "bench.csv"
    write_csv(sweep_csv, [r for r in rows if r["model"] in ("bert", "-")])
    write_csv(families, [{**r, "repeats": "3"} for r in e2e if r["model"] not in ("bert", "albert", "roberta")])
    assert report.main([str(sweep_csv), str(families), "--readme", str(readme)]) == 0
    both = readme.read_text()
    assert both.count("### ") == 1 and both.count("(UTC)") == 2
    assert "`families/bench.csv` (distilbert, deberta_v3, modernbert): measured" in both
    assert "p50 of 3 interleaved repetitions; the other settings as above" in both
    assert "| bert | 16 | 4 |" in both and "| deberta_v3 (eager attention) | 16 | 4 |" in both
    # A spot row times f = 0.5 only of the three fractions: the others keep their places as dashes.
    spot = next(line for line in both.splitlines() if line.startswith("| deberta_v3 (eager attention) | 16 | 4 |"))
    assert re.search(r"\| – / [0-9.]+ / – \| [0-9.]+ / – \|", spot), spot


def test_models_none_runs_no_sweep():
    args = sweep.parse_args(["--device", "cpu", "--models", "none", "--spot-models", "distilbert,modernbert"])
    assert args.models == [] and args.spot_models == ["distilbert", "modernbert"]
    assert sweep.parse_args(["--device", "cpu"]).spot_models == [
        "albert",
        "roberta",
        "distilbert",
        "deberta_v3",
        "modernbert",
    ]


def test_the_default_output_folder_is_a_new_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = sweep.parse_args(["--device", "cpu"]).output_dir
    assert first.parent.name == "bench-results" and first.name.startswith("cpu-")
    first.mkdir(parents=True)
    second = sweep.parse_args(["--device", "cpu"]).output_dir
    assert second != first and not second.exists()  # never an earlier run's folder (benchmarks/results/amd_epyc/cpu)


def test_peak_memory_keeps_the_profiler_log_off_stderr(capfd):
    import os

    import torch

    from earlyexit_kernels.bench.timing import _PROFILER_LOG, peak_memory

    x = torch.randn(64, 64)

    def call():
        os.write(2, b"USDT:2026-11-22 13:56:07 8460:8460 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a warning of the call itself\n")
        return x @ x

    assert peak_memory(call, torch.device("cpu")) >= x.numel() * 4
    err = capfd.readouterr().err
    assert "a warning of the call itself" in err
    assert not any(_PROFILER_LOG.match(line.encode()) for line in err.splitlines()), err


def test_a_run_killed_part_way_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """bench.csv and --append-csv hold each configuration's rows as soon as it is measured."""
    shared = tmp_path / "all.csv"
    common = ["--smoke", "--device", "cpu", "--spot-models", "none", "--no-micro", "--no-progress"]
    assert sweep.main([*common, "--output-dir", str(tmp_path / "a"), "--append-csv", str(shared)]) == 0
    with shared.open(newline="") as f:
        first = list(csv.DictReader(f))
    assert first and {r["B"] for r in first} == {"1", "4"}

    real, calls = sweep.measure_pattern, []

    def dies_on_the_second_configuration(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "measure_pattern", dies_on_the_second_configuration)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([*common, "--output-dir", str(tmp_path / "b"), "--append-csv", str(shared)])
    with (tmp_path / "b" / "bench.csv").open(newline="") as f:
        kept = list(csv.DictReader(f))
    assert kept and {(r["B"], r["pattern"]) for r in kept} == {("1", "sched-f0.00")}
    with shared.open(newline="") as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("kind,") for line in lines) == 1  # one header for both runs
    assert len(lines) == 1 + len(first) + len(kept)


def test_the_repository_s_microbenchmarks_join_a_sweep_s_csv_and_its_report(tmp_path):
    """``benchmarks/suite/micro.py`` writes the sweep's schema: appended to a bench.csv, the report finds its tables."""
    from benchmarks.suite import micro

    out = tmp_path / "cpu"
    argv = ["--smoke", "--device", "cpu", "--spot-models", "none", "--patterns", "sched-f0.50", "--no-progress"]
    assert sweep.main([*argv, "--no-baselines", "--output-dir", str(out)]) == 0
    tiny = ["--smoke", "--device", "cpu", "--size", "tiny", "--batch-sizes", "1,4", "--seq-len", "16", "--threads", "1"]
    assert micro.main([*tiny, "--append-csv", str(out / "bench.csv")]) == 0
    with (out / "bench.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"e2e", "exit_step", "compact"}
    assert {r["method"] for r in rows if r["kind"] == "exit_step"} >= {"torch", "naive"}
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    assert report.main([str(out / "bench.csv"), "--readme", str(readme)]) == 0
    assert "Exit step (head + Entropy rule), µs per call (p50), S = 16:" in readme.read_text()
    assert micro.main([*tiny, "--output-dir", str(tmp_path / "micro")]) == 0
    assert (tmp_path / "micro" / "exit_step_vs_batch.png").stat().st_size > 0
