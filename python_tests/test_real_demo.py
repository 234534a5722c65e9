"""The real-data demo and the real-task benchmark, run end to end on a tiny stand-in for MiniLM and Rotten Tomatoes.

The real model and data are the demo's and the benchmark's (``make demo``, benchmarks/); here
``fine_tuned_minilm`` and ``load_rotten_tomatoes`` are replaced by a tiny random classifier and
a few hundred word texts, so that what the two print and write is checked in seconds.
"""

from pathlib import Path

import pytest
from conftest import word_bert, word_texts
from transformers import BertForSequenceClassification

import earlyexit_kernels as eek
from benchmarks.suite import real_task_quality
from earlyexit_kernels.demo import real_demo
from earlyexit_kernels.demo.real_task import Split

pytest.importorskip("pyarrow", reason="the fit reads its data through the command line's tables")


# one torch thread for the module's tests, given back after (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(count: int, seed: int) -> Split:
    texts = [t or "w1" for t in word_texts(count, seed=seed, longest=16)]
    labels = [int(sum(int(w[1:]) < 30 for w in t.split()) * 2 > len(t.split())) for t in texts]
    return Split(texts, labels)


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    """Replace the fine-tuned MiniLM and the Rotten Tomatoes splits with tiny ones; returns the cache folder."""
    cache = tmp_path / "cache"
    folder = cache / "minilm-rt-tiny"
    folder.mkdir(parents=True)
    model, tokenizer = word_bert(folder, 2, labels={0: "rotten", 1: "fresh"}, max_position_embeddings=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    calls = []

    def fine_tuned(recipe=None, cache_dir=None, *, progress=True):
        calls.append(cache_dir)
        model = BertForSequenceClassification.from_pretrained(folder).eval()
        return model, tokenizer, {"cached": True, "seconds": 0.0, "path": str(folder)}

    splits = {"train": _split(192, 1), "validation": _split(64, 2), "test": _split(96, 3)}
    monkeypatch.setattr(
        real_demo, "fine_tuned_path", lambda backbone="minilm", recipe=None, cache_dir=None, task="": folder
    )
    for module in (real_demo, real_task_quality):
        monkeypatch.setattr(module, "fine_tuned_minilm", fine_tuned, raising=False)
        monkeypatch.setattr(module, "load_rotten_tomatoes", lambda seed=0: splits, raising=False)
    monkeypatch.setattr("earlyexit_kernels.demo.real_task.fine_tuned_minilm", fine_tuned)
    monkeypatch.setattr(
        "earlyexit_kernels.demo.real_task.fine_tuned_model",
        lambda backbone="minilm", recipe=None, cache_dir=None, *, progress=True, task="rotten_tomatoes": fine_tuned(
            recipe, cache_dir
        ),
    )
    monkeypatch.setattr("earlyexit_kernels.demo.real_task.load_rotten_tomatoes", lambda seed=0: splits)
    monkeypatch.setattr("earlyexit_kernels.demo.real_task.load_task", lambda task, seed=0: splits)
    return cache


def test_the_demo_fits_once_then_loads_and_reports_every_speed_up_with_its_ideal(tiny_task, tmp_path, capsys):
    report = tmp_path / "demo.txt"
    # the tiny validation split's 64 rows are the calibration rows: enough to certify 10 points, not 1
    real_demo.main(["--cache-dir", str(tiny_task), "--output", str(report), "--max-drop", "10"])
    first = capsys.readouterr().out
    assert "2. fitted the exit heads as `eek fit" in first and "--pooling" not in first  # chosen on the data
    assert "--calibration" in first and "the careful path" in first
    assert "calibrated them on 64 calibration rows from" in first  # the validation split, not rows of train
    assert "heads tried (pooling, form" in first
    assert "chosen:" in first and "accuracy of each layer's head alone on calibration rows" in first
    assert "budget: at most 10 point(s) lost with 95% confidence;" in first and "the test split:" in first
    assert "3. the test split (96 snippets)" in first
    for line in (
        "accuracy: early exit",
        "mean layers run:",
        "speed-up",
        "layer ideal",
        "pipeline('text-classification')",
    ):
        assert line in first
    assert first.count("layer ideal") == 2  # per batch against the unpatched model, the stream against the pipeline
    assert report.read_text().startswith("# python -m earlyexit_kernels.demo --cache-dir")
    # where the README says: demo/ of the cache folder (.cache/demo of the checkout by default)
    assert [p.name for p in sorted((tiny_task / "demo").iterdir())] == [
        "model",
        "test.csv",
        "train.csv",
        "validation.csv",
    ]
    fitted = list(tiny_task.glob("minilm-rt-tiny-exit-*"))
    assert len(fitted) == 1 and (fitted[0] / "eek_fit.json").is_file()

    real_demo.main(["--cache-dir", str(tiny_task), "--max-drop", "10"])
    second = capsys.readouterr().out
    assert f"2. exit heads: loaded from {fitted[0]}" in second

    def chosen(text):
        return next(line for line in text.splitlines() if "chosen:" in line)

    assert chosen(first) == chosen(second)


def test_the_demo_takes_the_careful_path_on_files_eek_fit_reads_and_fits_alike(tiny_task, tmp_path, capsys):
    """The demo writes the classifier and the splits as files; read back by the package's own
    table reader they are the splits, and the `eek fit` command the demo prints, run on them,
    fits what the demo fitted: the validation split as --calibration."""
    import json
    import shlex

    from earlyexit_kernels.integrations.cli import main as eek_main
    from earlyexit_kernels.integrations.table_io import read_labelled

    exported = tmp_path / "files"
    real_demo.main(["--cache-dir", str(tiny_task), "--export", str(exported), "--max-drop", "10"])
    out = capsys.readouterr().out
    command = shlex.split(out.split("2. fitted the exit heads as `")[1].split("` does")[0])
    assert command[:2] == ["eek", "fit"] and command[2:4] == [str(exported / "model"), str(exported / "train.csv")]
    assert command[command.index("--calibration") + 1] == str(exported / "validation.csv")
    splits = real_demo.load_rotten_tomatoes()
    for name, split in splits.items():
        rows = read_labelled(str(exported / f"{name}.csv"))
        assert rows.texts == split.texts and rows.labels == [("rotten", "fresh")[y] for y in split.labels]
    assert (exported / "model" / "config.json").is_file() and (exported / "model" / "vocab.txt").is_file()

    demo_folder = command[4]
    refit = tmp_path / "refit"
    assert eek_main([*command[1:4], str(refit), *command[5:]]) == 0
    capsys.readouterr()
    ours, theirs = (json.loads((Path(f) / "eek_fit.json").read_text()) for f in (demo_folder, refit))
    assert theirs["calibration_rows"] == len(splits["validation"]) and theirs["train_rows"] == len(
        splits["train"]
    ) - round(0.1 * len(splits["train"]))
    # the order the rows are read in is drawn anew each fit; the exact tests never read it, so all else agrees
    for fit in (ours, theirs):
        assert isinstance(fit["certificate"].pop("order_seed"), int)
    for key in ("policy", "certificate", "pooling", "head", "layer_scores", "curve"):
        assert ours[key] == theirs[key], key


def test_the_demo_prints_a_line_per_stage_with_its_estimate_where_stderr_is_not_a_terminal(tiny_task, capsys):
    real_demo.main(["--cache-dir", str(tiny_task), "--max-drop", "10"])
    err = capsys.readouterr().err  # pytest's capture: not a terminal
    lines = [line for line in err.splitlines() if line.startswith("stage ")]
    starts = [line for line in lines if " done in " not in line]
    assert [line.split(":")[0] for line in starts] == [f"stage {k}/4" for k in range(1, 5)]
    assert [line.split(" done in ")[0] for line in lines if " done in " in line] == [
        f"stage {k}/4" for k in range(1, 5)
    ]
    fitting = starts[1]
    assert "fitting the exit heads" in fitting and "first run only, then cached" in fitting
    assert f"on {real_demo.MEASURED['machine']}" in fitting and "about " in fitting
    assert "about " in starts[2] and "about " in starts[3]

    real_demo.main(["--cache-dir", str(tiny_task), "--max-drop", "10"])
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stage 2/4:")]
    assert again == ["stage 2/4: the exit heads: loading them from the cache"]


def test_the_demo_s_estimates_are_measured():
    measured = real_demo.MEASURED
    assert "measured" in measured["machine"]
    stages = [key for key in measured if key != "machine"]
    assert sorted(stages) == ["fine_tune", "fit", "per_batch", "stream"]
    assert all(seconds > 0 and rows > 0 for seconds, rows in (measured[key] for key in stages))


def test_the_real_task_benchmark_writes_its_csv_and_its_section(tiny_task, tmp_path):
    csv_path, readme = tmp_path / "real.csv", tmp_path / "benchmarks.md"
    readme.write_text(
        f"# Benchmarks\n\nbefore\n\n{real_task_quality.MARK_START}\nSTALE SECTION\n{real_task_quality.MARK_END}\n\nafter\n"
    )
    common = ["--joint-train-rows", "64", "--output", str(csv_path), "--readme", str(readme)]
    real_task_quality.main(["--runs", "pabee", *common])
    saved = tmp_path / "models"
    real_task_quality.main(
        ["--runs", "heads (mean, mlp)", "auto heads", *common, "--append", "--save-models", str(saved)]
    )
    comments, rows = real_task_quality._read_csv(str(csv_path))
    assert sorted(p.name for p in saved.iterdir()) == ["auto-heads", "heads-mean-mlp"]
    from earlyexit_kernels.patching.patch import policy_of

    reloaded = eek.from_pretrained(str(saved / "heads-mean-mlp"))
    calibrated = next(r for r in rows if r["kind"] == "operating" and r["run"] == "heads (mean, mlp)")["policy"]
    assert policy_of(reloaded).to_code(4) == calibrated, "the saved model holds the calibrated threshold"
    assert [c.split(" --")[1] for c in comments if c.startswith("python")] == [
        "runs pabee",
        "runs heads (mean, mlp) auto heads",
    ]
    operating = [r for r in rows if r["kind"] == "operating"]
    assert [(r["run"], int(r["train_rows"])) for r in operating] == [
        ("pabee", 64),
        ("heads (mean, mlp)", 192),
        ("auto heads", 192),
    ]
    auto = operating[-1]
    assert auto["pooling"] in ("auto: cls", "auto: mean") and auto["head"] in ("auto: model", "auto: mlp")
    for r in operating:
        statics = [row for row in rows if row["kind"] == "static" and row["run"] == r["run"]]
        assert [int(s["layer"]) for s in statics] == [1, 2, 3, 4]
        assert float(r["full_accuracy"]) == float(statics[-1]["accuracy"])
        assert float(r["speedup"]) > 0 and float(r["ideal"]) == pytest.approx(4 / float(r["mean_layers"]))
        assert (r["why"] != "") == (float(r["saved_fraction"]) < real_task_quality.LITTLE_SAVING)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "STALE" not in text
    assert 0 < text.index("| heads (mean, mlp) | `") < text.index("| pabee | `")  # in the order of RUNS
    assert "| within 1 point of its own | of the starting model |" in text
    results = tmp_path / "checkout" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "real_task_debates_cpu.csv").write_text(csv_path.read_text())
    side = real_task_quality.render_side_by_side(tmp_path / "checkout")
    assert side.count("| MiniLM-L6 on the 2016 debates (three classes) |") == 3 and "of 4 |" in side
    assert "Rotten Tomatoes" not in side.split("|---|")[1]  # only the CSVs that exist


def test_each_backbone_and_task_has_its_own_csv_and_section():
    assert real_task_quality.outputs()[:3] == (
        real_task_quality.DEFAULT_CSV,
        real_task_quality.MARK_START,
        real_task_quality.MARK_END,
    )
    paths = {real_task_quality.outputs(b, t)[:3] for b in ("minilm", "mpnet") for t in ("rotten_tomatoes", "debates")}
    assert len({p[0] for p in paths}) == len({p[1] for p in paths}) == 4
    assert real_task_quality.outputs("mpnet", "debates")[0] == "benchmarks/results/real_task_mpnet_debates_cpu.csv"
