"""Which runtime runs the int8 layers, chosen by timing the installed ones on the user's rows: the family's
recipe stays unless another runtime is faster in enough rounds that a sign test tells it apart (10 of 12), and
never for one that changes significantly more answers; ``eek fit --dtype int8`` records the choice, its timings
and the CPU class, and says why."""

import json

import pytest
import torch
from conftest import tiny_model
from conftest import write_table as _write
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture

import earlyexit_kernels as eek
from earlyexit_kernels.engine.layers import runtime_choice
from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.engine.layers.ort_layer import ort_available
from earlyexit_kernels.engine.layers.precision import int8_recipe
from earlyexit_kernels.engine.layers.runtime_choice import changed_answers_worse, choose_int8_layers
from earlyexit_kernels.integrations.int8_fit import int8_base
from earlyexit_kernels.patching.fit_record import FitRecord

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not ort_available(), reason="the family's int8 recipe runs on ONNX Runtime (onnxruntime)"),
]


def _model():
    return eek.patch(tiny_model("bert", num_layers=2, seed=4), eek.Entropy(0.0))  # never exits: full depth


def _batches(count: int = 2, rows: int = 8, width: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [
        {
            "input_ids": torch.randint(5, 90, (rows, width), generator=generator),
            "attention_mask": torch.ones(rows, width, dtype=torch.long),
        }
        for _ in range(count)
    ]


# -------------------------------------------------------------------------- agreement: a noise-aware refusal


def test_more_changed_answers_refuse_a_runtime_only_where_the_exact_test_says_so():
    default = [False] * 40
    # 5 rows changed by the candidate alone: P(>= 5 of 5 | no difference) = 1/32 < 0.05
    assert changed_answers_worse([True] * 5 + [False] * 35, default)
    # 4 of 4: 1/16, inside the noise
    assert not changed_answers_worse([True] * 4 + [False] * 36, default)
    # the rows both changed say nothing about which is worse
    both = [True] * 10 + [False] * 30
    assert not changed_answers_worse(both, both)
    # 6 changed by the candidate alone against 1 by the default: P(>= 6 of 7) = 8/128 = 0.0625
    assert not changed_answers_worse([True] * 6 + [False] * 34, [False] * 39 + [True])
    with pytest.raises(ValueError, match="on the same rows"):
        changed_answers_worse([True], [True, False])


# ------------------------------------------------------------------------------- the timing on real runtimes


def test_every_installed_runtime_is_timed_and_the_model_is_left_float32():
    model = _model()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    choice = choose_int8_layers(model, _batches(), default=int8_recipe(model), reference=model)
    assert choice.by == "timed" and choice.cpu == int8_isa() and choice.rows == 16
    assert choice.recipe in runtime_choice.candidate_recipes(choice.default)
    assert set(choice.seconds) <= set(runtime_choice.candidate_recipes(choice.default))
    assert choice.default in choice.seconds and all(s > 0 for times in choice.seconds.values() for s in times)
    assert set(choice.changed) == set(runtime_choice.candidate_recipes(choice.default))
    assert choice.reason.startswith("int8 layers: ") and "on this" in choice.reason
    saved = choice.as_dict()
    assert json.loads(json.dumps(saved)) == saved and saved["recipe"] == choice.recipe
    assert not hasattr(model, "eek_int8_recipe")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_nothing_to_time_on_is_refused():
    with pytest.raises(ValueError, match="at least one batch"):
        choose_int8_layers(_model(), [], default="per-token-ort")
    with pytest.raises(ValueError, match="rounds must be at least 5"):
        choose_int8_layers(_model(), _batches(), default="per-token-ort", rounds=4)


def test_the_wins_needed_are_the_sign_test_s_at_5_percent():
    # all of 5: 1/32; 10 of 12: 79/4096 = 0.019, where 9 of 12 is 299/4096 = 0.073
    assert [runtime_choice.wins_needed(n) for n in (4, 5, 9, 12)] == [None, 5, 8, 10]
    assert runtime_choice.wins_needed(runtime_choice.ROUNDS) == 10


# ----------------------------------------------------------------- the rule, on timings given by the test


@pytest.fixture
def timings(monkeypatch):
    """Each candidate's seconds per round on the batches (``table[recipe]``) and on the single rows
    (``table[recipe, "single"]``, the batches' where not given), as the test gives them (the runtimes still built
    and run once); ``calls``: the recipes timed on the batches, in order."""
    table: dict = {}
    calls: list[str] = []
    single_calls: list[str] = []

    def seconds(model, batches):
        recipe = model.eek_int8_recipe
        if batches[0]["input_ids"].shape[0] == 1:  # the single rows: untimed once before the first round
            single_calls.append(recipe)
            rounds = sum(c == recipe for c in single_calls) - 1
            return table.get((recipe, "single"), table[recipe])[rounds - 1] if rounds else 0.0
        timed = sum(c == recipe for c in calls)  # this recipe's rounds so far
        calls.append(recipe)
        return table[recipe][timed]

    monkeypatch.setattr(runtime_choice, "_seconds", seconds)
    monkeypatch.setattr(runtime_choice, "candidate_recipes", lambda default, calibrated: [default, "per-token"])
    return table, calls


def test_a_runtime_faster_in_enough_rounds_is_chosen_and_the_timing_stops_at_its_wins(timings):
    table, calls = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.9, 0.8, 0.95, 0.9, 0.99] * 2 + [0.9, 0.9]})
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort")
    assert choice.recipe == "per-token" and len(choice.seconds["per-token"]) == 10  # its 10th win: decided
    assert choice.reason.startswith("int8 layers: torch, faster than onnxruntime in 10 of 10 rounds")


def test_a_round_or_two_lost_to_a_burst_of_noise_does_not_hide_a_faster_runtime(timings):
    """The first rule asked for every round: one round a burst slowed kept the slower runtime."""
    table, _ = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.75, 0.75, 1.3, 0.75, 0.75, 0.75, 1.2] + [0.75] * 5})
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort")
    assert choice.recipe == "per-token" and "in 10 of 12 rounds" in choice.reason


def test_a_runtime_faster_on_batches_but_slower_on_single_rows_is_not_chosen(timings):
    """A fixed cost per call loses single-text traffic: a folder serves either, so the choice asks for both."""
    table, calls = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.6] * 12})
    table["per-token-ort", "single"], table["per-token", "single"] = [0.1] * 12, [0.15] * 12
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort")
    assert choice.recipe == "per-token-ort" and len(calls) == 6  # no win in three rounds: out
    assert "faster on both the batches and the single rows" in choice.reason
    assert "onnxruntime 1000 / 100 ms" in choice.reason and "torch 600 / 150 ms" in choice.reason
    assert choice.single_rows == 16 and choice.as_dict()["single_seconds"]["per-token"] == [0.15] * 3


def test_a_folder_fitted_for_batches_times_the_batches_alone_and_keeps_their_faster_runtime(timings):
    """eek fit --traffic batches (a corpus, requests of many texts): the single rows are neither timed nor asked."""
    table, calls = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.6] * 12})
    table["per-token-ort", "single"], table["per-token", "single"] = [0.1] * 12, [0.15] * 12
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort", traffic="batches")
    assert choice.recipe == "per-token" and len(calls) == 20  # its 10th win of 10 rounds: decided
    assert choice.reason.startswith("int8 layers: torch, faster than onnxruntime in 10 of 10 rounds")
    assert "(16 rows in batches, at full depth" in choice.reason and "one at a time" not in choice.reason
    assert choice.single_rows == 0 and not choice.single_seconds
    assert choice.as_dict()["traffic"] == "batches" and "single_seconds" not in choice.as_dict()


def test_a_folder_fitted_for_single_texts_times_them_alone(timings):
    """eek fit --traffic texts: the same runtimes timed one row at a time, where the batches' winner loses."""
    table, calls = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.6] * 12})
    table["per-token-ort", "single"], table["per-token", "single"] = [0.1] * 12, [0.15] * 12
    kept = choose_int8_layers(_model(), _batches(), default="per-token-ort", traffic="texts")
    assert kept.recipe == "per-token-ort" and calls == []  # the batches never timed
    assert "no other runtime was faster one row at a time in 10 of 12 rounds" in kept.reason
    assert "(16 rows one at a time, at full depth" in kept.reason and "onnxruntime 100 ms" in kept.reason
    assert not kept.seconds and kept.single_seconds["per-token"] == [0.15] * 3 and kept.rows == 0


def test_a_folder_fitted_for_single_texts_keeps_their_faster_runtime_whatever_the_batches_say(timings):
    table, calls = timings
    table.update({"per-token-ort": [0.6] * 12, "per-token": [1.0] * 12})
    table["per-token-ort", "single"], table["per-token", "single"] = [0.15] * 12, [0.1] * 12
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort", traffic="texts")
    assert choice.recipe == "per-token" and calls == [] and choice.as_dict()["traffic"] == "texts"


def test_traffic_is_one_of_three_and_said_before_any_timing():
    with pytest.raises(ValueError, match="traffic must be one of both, batches, texts"):
        choose_int8_layers(_model(), _batches(), default="per-token-ort", traffic="corpus")


def test_the_single_rows_are_the_batches_first_rows_without_their_padding():
    batch = {
        "input_ids": torch.tensor([[7, 8, 9, 0], [0, 5, 6, 4]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]),
    }
    rows = runtime_choice._single_rows([batch, batch], count=3)
    assert [r["input_ids"].tolist() for r in rows] == [[[7, 8, 9]], [[5, 6, 4]], [[7, 8, 9]]]
    assert all(r["attention_mask"].all() for r in rows)


def test_three_lost_rounds_keep_the_family_s_recipe_and_stop_the_timing(timings):
    table, calls = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.5, 1.01, 0.5, 1.01, 0.5, 0.5, 1.01] + [0.5] * 5})
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort")
    # out at its third lost round (7 rounds of 2): 10 wins of 12 can no longer be reached
    assert choice.recipe == "per-token-ort" and len(calls) == 14
    assert "in 10 of 12 rounds" in choice.reason and "faster on both" in choice.reason
    table.update({"per-token-ort": [1.0] * 12, "per-token": [1.2] * 12})
    calls.clear()
    assert choose_int8_layers(_model(), _batches(), default="per-token-ort").recipe == "per-token-ort"
    assert len(calls) == 6  # slower from the first round: out after three


def test_a_faster_runtime_that_changes_more_answers_is_not_chosen(timings, monkeypatch):
    table, _ = timings
    table.update({"per-token-ort": [1.0] * 12, "per-token": [0.5] * 12})
    monkeypatch.setattr(runtime_choice, "changed_answers_worse", lambda candidate, default: True)
    choice = choose_int8_layers(_model(), _batches(), default="per-token-ort", reference=_model())
    assert choice.recipe == "per-token-ort" and "torch changed significantly more answers" in choice.reason


# ------------------------------------------------------------------------------------ where eek fit asks


def test_asked_layers_are_not_timed_and_unknown_ones_are_refused():
    model = _model()
    with int8_base(model, layers="torch", batches=_batches()) as (_, choice):
        assert choice.recipe == "per-token" and choice.by == "asked" and not choice.seconds
        assert model.eek_int8_recipe == "per-token"
    with int8_base(model) as (_, choice):  # nothing to time on: the family's
        assert choice.by == "family" and choice.recipe == int8_recipe(model)


def test_eek_fit_records_the_choice_and_says_why(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(120, seed=42), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", *FAST, "--dtype", "int8", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    record = FitRecord.load(tmp_path / "out")
    assert record.int8_layers["by"] == "timed" and record.int8_layers["recipe"] == record.int8_recipe
    assert record.int8_layers["cpu"] == record.int8_isa == int8_isa()
    assert record.int8_layers["rows"] == 64 and record.int8_layers["reason"] in printed
    assert _run("fit", classifier, train, tmp_path / "asked", *FAST, "--dtype", "int8", "--layers", "torch") == 0
    assert FitRecord.load(tmp_path / "asked").int8_recipe == "per-token"
    # certified anew with --layers auto: on the layers the folder names, not the family's
    rows = _write(_frame(80, seed=44), tmp_path / "rows.csv")
    assert _run("calibrate", tmp_path / "asked", rows, "--dtype", "int8", "--confidence", "off", "--force") == 0
    again = FitRecord.load(tmp_path / "asked")
    assert again.int8_recipe == "per-token" and again.int8_layers["by"] == "asked"
    argv = ("--dtype", "int8", "--layers", "onnxruntime", "--confidence", "off", "--force")
    assert _run("calibrate", tmp_path / "asked", rows, *argv) == 0
    moved = FitRecord.load(tmp_path / "asked")  # the fit's choice no longer names the layers certified: dropped
    assert moved.int8_recipe == "per-token-ort" and moved.int8_layers is None


def test_layers_without_int8_are_refused_before_any_work(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(60, seed=42), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", *FAST, "--layers", "torch") == 2
    assert "--layers torch says where the int8 layers run: give --dtype int8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eek_fit_for_batches_records_its_traffic_and_refuses_it_where_nothing_is_timed(
    classifier,  # noqa: F811
    tmp_path,
    capsys,
):
    train = _write(_frame(120, seed=42), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", *FAST, "--dtype", "int8", "--traffic", "batches") == 0
    saved = FitRecord.load(tmp_path / "out").int8_layers
    assert saved["traffic"] == "batches" and saved["rows"] == 64 and "single_seconds" not in saved
    assert saved["reason"] in capsys.readouterr().out
    for asked in (("--traffic", "texts"), ("--dtype", "int8", "--layers", "torch", "--traffic", "texts")):
        assert _run("fit", classifier, train, tmp_path / "refused", *FAST, *asked) == 2
        assert "--traffic texts says which calls the int8 runtimes are timed on" in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_the_choice_round_trips_through_the_record_and_an_older_record_holds_none(tmp_path):
    choice = runtime_choice.LayersChoice(
        "per-token-ort", "per-token-ort", "int8 layers: onnxruntime", rows=64, seconds={"per-token-ort": [0.5]}
    )
    FitRecord(base="int8", int8_recipe="per-token-ort", int8_layers=choice.as_dict()).save(tmp_path)
    assert FitRecord.load(tmp_path).int8_layers == choice.as_dict()
    saved = json.loads((tmp_path / "eek_fit.json").read_text())
    del saved["int8_layers"]  # a folder fitted before the choice was recorded
    (tmp_path / "eek_fit.json").write_text(json.dumps(saved))
    assert FitRecord.load(tmp_path).int8_layers is None
