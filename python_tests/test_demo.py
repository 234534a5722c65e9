"""The demo task is reproducible and mixes easy and hard sequences; the demo runs end to end."""

import contextlib
import io

import pytest
import torch

from earlyexit_kernels.demo import report as demo
from earlyexit_kernels.demo.task import CLS, KEYWORDS, NOT, PAD, SEP, TaskConfig, make_split


def test_the_task_is_reproducible_from_its_seed():
    first, again, other = make_split(64, seed=3), make_split(64, seed=3), make_split(64, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_sequences_are_padded_and_framed_by_cls_and_sep():
    config = TaskConfig()
    split = make_split(200, seed=0, config=config)
    lengths = split["attention_mask"].sum(1)
    assert lengths.min() >= config.min_len and lengths.max() <= config.max_len and len(set(lengths.tolist())) > 5
    for ids, length in zip(split["input_ids"], lengths):
        assert ids[0] == CLS and ids[length - 1] == SEP and (ids[length:] == PAD).all()


def test_easy_sequences_hold_one_class_and_hard_ones_both():
    split = make_split(400, seed=0)
    hard = split["hard"]
    assert 0.4 < hard.float().mean() < 0.6 and 0.4 < split["labels"].float().mean() < 0.6
    for ids, label, is_hard in zip(split["input_ids"], split["labels"], hard):
        counts = [int(torch.isin(ids, k).sum()) for k in KEYWORDS]
        negated = int((ids == NOT).sum()) % 2
        if is_hard:
            assert abs(counts[0] - counts[1]) == 1 and min(counts) >= 1
            majority = int(counts[1] > counts[0])
            assert label == majority ^ negated
        else:
            assert counts[1 - label] == 0 and counts[label] >= 3 and negated == 0


SMALL = [
    "--train-size", "128", "--test-size", "64", "--epochs", "1", "--repeats", "1",
    "--method-train-size", "64", "--val-size", "64", "--method-repeats", "1",
]  # fmt: skip


def _run_demo(*args: str) -> str:
    """What ``python -m earlyexit_kernels.demo SMALL args`` prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo.main([*SMALL, *args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The demo run once on a fresh cache: (what it printed, its report, the cache folder)."""
    folder = tmp_path_factory.mktemp("demo")
    report, cache = folder / "demo.txt", str(folder / "cache")
    printed = _run_demo("--cache-dir", cache, "--output", str(report))
    return printed, report.read_text(), cache


def test_demo_runs_end_to_end_and_writes_its_report(first_run):
    printed, text, _ = first_run
    for name in ("full model", "Patience(2)", "Entropy(0.2)", "MaxProb(0.9)", "speed-up", "methods side by side"):
        assert name in printed
    for method in (
        "pabee: Patience(",
        "deebert: Entropy(",
        "fastbert: Entropy(",
        "palbert: QExit(q=",
        "ensemble: Voting(",
        "dact: DACT()",
        "smartbert: SkipGates(",
    ):
        assert method in printed
    for runner in ("pipeline, full model", "per-batch early exit", "eek.classify"):
        assert runner in printed.split("as a stream")[1]
    assert text.startswith("# python -m earlyexit_kernels.demo") and "full model" in text


def test_a_second_run_loads_what_the_first_trained(first_run):
    first, _, cache = first_run
    assert "saved to" in first and "trained 2 steps" in first
    second = _run_demo("--cache-dir", cache)
    assert "loaded the trained backbone and exit heads from" in second
    assert "each loaded from the cache" in second
    table = [line for line in first.splitlines() if line.startswith(("pabee:", "dact:"))]
    again = [line for line in second.splitlines() if line.startswith(("pabee:", "dact:"))]
    assert [line[:80] for line in table] == [line[:80] for line in again]  # same models, same answers


def test_a_speed_up_beyond_its_ideal_or_within_its_noise_is_not_reported():
    assert str(demo.Speedup([1.5, 1.6, 1.7], ideal=2.0)).startswith("1.60x [1.54-1.66] of 2.00x")
    assert demo.Speedup([2.7, 2.7, 2.7], ideal=6 / 4.45).noise.startswith("noisy: 2.70x is beyond the ideal 1.35x")
    assert demo.Speedup([0.6, 1.1, 1.6], ideal=2.0).noise.startswith("noisy: range 0.80-1.40x is wider")
    assert demo.Speedup([1.5, 1.6, 1.7], ideal=1.50).noise is None  # 1.6 is within 10% of its ideal
