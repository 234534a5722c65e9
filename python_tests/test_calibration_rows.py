"""Certifying on rows the classifier never trained on: ``eek fit --calibration FILE`` and ``eek calibrate FOLDER FILE``.

The classifier's own fine-tuning rows make every exit look worse than it is (the full model is
best there); rows it never saw certify the threshold for what it will serve. ``--calibration``
gives them to ``eek fit`` (every training row then trains the heads); ``eek calibrate`` certifies
an existing folder anew, heads fixed, and writes the new threshold and certificate back.
"""

import dataclasses
import json

import pytest
import torch
from conftest import write_table as _write
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture
from transformers import BertForSequenceClassification, BertTokenizerFast

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.table_io import read_labelled
from earlyexit_kernels.training.calibrate_texts import calibrate_texts, calibration_goal
from earlyexit_kernels.training.fit_config import file_rows_to_certify, least_rows_to_certify
from earlyexit_kernels.training.labelled_texts import label_ids, split_rows
from earlyexit_kernels.training.share_probe import ShareSettings, choose_share

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")


@pytest.fixture(scope="module")
def fitted(classifier, tmp_path_factory):  # noqa: F811
    """A folder fitted without a certificate (uncertified threshold on 30 validation rows)."""
    folder = tmp_path_factory.mktemp("fitted") / "model"
    train = _write(_frame(300, seed=21), folder.parent / "train.csv")
    assert _run("fit", classifier, train, folder, *FAST) == 0
    return folder


def test_fit_certifies_on_the_calibration_file_and_trains_on_every_training_row(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(200, seed=22), tmp_path / "train.csv")
    unseen = _write(_frame(700, seed=23, labels=None), tmp_path / "unseen.parquet")
    out = tmp_path / "certified"
    assert _run("fit", classifier, train, out, "--calibration", unseen, "--max-drop", "5", "--epochs", "2") == 0
    printed = capsys.readouterr().out
    # 10% of 200 for validation, none kept out: the 700 given rows certify
    assert f"on 180 rows and calibrated them on 700 calibration rows from {unseen} (--calibration)" in printed
    summary = json.loads((out / "eek_fit.json").read_text())
    assert (summary["train_rows"], summary["calibration_rows"]) == (180, 700)
    # unlabelled calibration rows: the budget is on agreement with the full model
    assert summary["target"] == "agreement" and summary["certificate"]["rows"] == 700
    assert summary["certificate"]["risk"].startswith("rows whose early exit predicts another class")
    assert eek.policy_of(eek.from_pretrained(str(out))).to_code(4) == summary["policy"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("too few rows", "200 calibration rows (--calibration) cannot certify a drop of at most 1 points"),
        ("other labels", "which are neither the model's label names ('neg', 'pos'"),
        ("other columns", "has no column 'text' (--text-column)"),
    ],
)
def test_a_calibration_file_that_cannot_serve_says_what_to_change(classifier, tmp_path, capsys, case, message):  # noqa: F811
    train = _write(_frame(60, seed=24), tmp_path / "train.csv")
    frame = _frame(200 if case == "too few rows" else 400, seed=25)
    if case == "other labels":
        frame["label"] = ["good" if label == "pos" else "bad" for label in frame.label]
    if case == "other columns":
        frame = frame.rename(columns={"text": "sentence"})
    calibration = _write(frame, tmp_path / "calibration.csv")
    assert _run("fit", classifier, train, tmp_path / "out", "--calibration", calibration, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    if case == "too few rows":
        assert f"even a model that never errs needs {least_rows_to_certify(1.0, 0.95)} rows" in err


def test_the_rows_a_training_file_needs_count_both_splits():
    """The number the too-few-rows message asks for: that many rows certify, one fewer does not."""
    least = least_rows_to_certify(1.0, 0.95)
    assert least == 299  # (1 - 0.01)^299 < 0.05 <= (1 - 0.01)^298: a zero loss on 299 rows rejects 1% at 95%
    for calibration_fraction, validation_split in ((0.25, 0.1), (0.25, None), (0.3, 0.2)):
        needed = file_rows_to_certify(least, calibration_fraction, validation_split)

        def calibration_rows(file_rows, validation_split=validation_split, calibration_fraction=calibration_fraction):
            training = file_rows
            if validation_split is not None:
                training = len(split_rows(file_rows, validation_split)[0])
            return len(split_rows(training, calibration_fraction)[1])

        assert calibration_rows(needed) >= least > calibration_rows(needed - 1)
    assert file_rows_to_certify(least, 0.25, 0.1) > 299 / 0.25  # the validation split is counted


def test_fit_s_too_few_rows_message_names_a_file_size_that_works(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(400, seed=26), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", "--epochs", "1") == 2
    err = capsys.readouterr().err
    needed = file_rows_to_certify(299, 0.25, 0.1)
    assert "90 calibration rows (0.25 of the 360 training rows after its --validation-split of 0.1)" in err
    assert f"Give a training file of at least {needed} rows" in err and "--calibration FILE" in err


def test_calibrate_certifies_a_folder_anew_and_writes_it_back(fitted, tmp_path, capsys):
    before = json.loads((fitted / "eek_fit.json").read_text())
    files = {p.name for p in fitted.iterdir()}
    assert before["certificate"] is None  # fitted without a certificate
    rows = _frame(700, seed=27)
    data = _write(rows, tmp_path / "unseen.csv")
    capsys.readouterr()
    assert _run("calibrate", fitted, data, "--max-drop", "5", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "calibrated on 700 rows (accuracy); the heads are unchanged" in printed
    assert "with confidence 95% (exchangeable rows) on 700 calibration rows" in printed
    after = json.loads((fitted / "eek_fit.json").read_text())
    assert after["calibration_rows"] == 700 and after["certificate"]["budget"] == 0.05
    assert after["recalibrations"][-1]["previous_policy"] == before["policy"]
    assert after["method"] == before["method"] and after["train_rows"] == before["train_rows"]  # the fit's record kept
    model = eek.from_pretrained(str(fitted))
    assert eek.policy_of(model).to_code(4) == after["policy"]
    assert files <= {p.name for p in fitted.iterdir()}  # the tokenizer and any other file stay
    assert not any(p.name.startswith(".") for p in fitted.parent.iterdir())  # no temporary folder left

    # the command is the library call on the same rows: the same threshold
    fresh = eek.from_pretrained(str(fitted))
    eek.patch(fresh, eek.Entropy(0.0))  # any threshold of the family: calibration replaces it
    goal = calibration_goal(5.0, 0.95, "probable", None)
    report = calibrate_texts(fresh, BertTokenizerFast.from_pretrained(str(fitted)), read_labelled(data), goal)
    assert report.policy == after["policy"] and report.rows == 700
    assert eek.policy_of(fresh).to_code(4) == after["policy"]

    # the next run keeps the folder's budget and confidence
    assert _run("calibrate", fitted, data, "--no-progress") == 0
    again = json.loads((fitted / "eek_fit.json").read_text())
    assert again["certificate"]["budget"] == 0.05 and len(again["recalibrations"]) == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("not a folder", "is not a folder"),
        ("too few rows", "100 rows cannot certify a drop of at most 1 points with confidence 0.95"),
        ("other labels", "which are neither the model's label names ('neg', 'pos'"),
        ("bad budget", "max_drop must be >= 0 accuracy points, got -1.0"),
    ],
)
def test_calibrate_refuses_what_it_cannot_certify(fitted, tmp_path, capsys, case, message):
    frame = _frame(100 if case == "too few rows" else 400, seed=28)
    folder, extra = fitted, ["--max-drop", "1"]
    if case == "not a folder":
        folder = tmp_path / "nothing"
    if case == "other labels":
        frame["label"] = ["good" if label == "pos" else "bad" for label in frame.label]
    if case == "bad budget":
        extra = ["--max-drop", "-1"]
    data = _write(frame, tmp_path / "rows.csv")
    policy = json.loads((fitted / "eek_fit.json").read_text())["policy"]
    assert _run("calibrate", folder, data, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert json.loads((fitted / "eek_fit.json").read_text())["policy"] == policy  # untouched


def test_fit_says_when_the_training_file_looks_like_the_classifier_s_fine_tuning_rows(classifier, tmp_path, capsys):  # noqa: F811
    """Training rows labelled with the full model's own answers (where it is always right) and
    validation rows with labels it gets half right: the report tells the user to certify elsewhere."""
    model = BertForSequenceClassification.from_pretrained(classifier).eval()
    tokenizer = BertTokenizerFast.from_pretrained(classifier)

    def own_answers(frame):
        with torch.no_grad():
            logits = model(**tokenizer(list(frame.text), return_tensors="pt", padding=True)).logits
        return [model.config.id2label[int(i)] for i in logits.argmax(-1)]

    train = _frame(400, seed=29)
    train["label"] = own_answers(train)
    validation = _frame(150, seed=30)  # the task's labels: the untrained classifier is at chance on them
    common = ("--validation", _write(validation, tmp_path / "val.csv"), "--max-drop", "5", "--epochs", "1")
    assert _run("fit", classifier, _write(train, tmp_path / "train.csv"), tmp_path / "out", *common) == 0
    printed = capsys.readouterr().out
    assert (
        "warning: the full model is right on 100.0% of the 100 calibration rows kept out of the training file"
        in printed
    )
    assert "--calibration FILE" in printed

    # rows it never saw, given: no such warning
    unseen = _write(_frame(300, seed=31), tmp_path / "unseen.csv")
    again = ("fit", classifier, tmp_path / "train.csv", tmp_path / "out2", "--calibration", unseen, *common)
    assert _run(*again) == 0
    assert "likely fine-tuned" not in capsys.readouterr().out


def _encoded_rows(classifier, count, seed):  # noqa: F811
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode

    frame = _frame(count, seed=seed)
    data = LabelledTexts(list(frame.text), None, list(frame.label), "rows")
    model = BertForSequenceClassification.from_pretrained(classifier).eval()
    tokenizer = BertTokenizerFast.from_pretrained(classifier)
    return model, encode(tokenizer, data, 64), label_ids(data, model.config)


#: the probe's settings on 1,500 training rows: a fixed quarter where nothing is probed, 5% at 95%
SHARE = ShareSettings(
    method="heads", pooling="auto", head="auto", least=299, fraction=0.25, seed=0, budget=0.05, confidence=0.95
)


def _share_rows(folder):
    """The model, 1,500 training rows and their labels, then 200 validation rows and theirs."""
    model, train, labels = _encoded_rows(folder, 1500, seed=32)
    _, validation, val_labels = _encoded_rows(folder, 200, seed=33)
    return model, train, labels, validation, val_labels


def test_the_calibration_share_is_all_but_the_rows_the_heads_need(classifier):  # noqa: F811
    model, train, labels, validation, val_labels = _share_rows(classifier)
    common = SHARE
    share = choose_share(model, train, labels, validation, val_labels, dataclasses.replace(common, first=64))
    assert sorted(share.train + share.calibration) == list(range(1500))
    assert "doubling" in share.reason and len(share.probe) >= 2
    assert len(share.calibration) > 0.25 * 1500  # more rows certify than a fixed quarter would give
    # every row the probe trained on trains the heads: the calibration rows were never read
    order = torch.randperm(1500, generator=torch.Generator().manual_seed(1)).tolist()
    assert set(order[: share.probe[-1][0]]) == set(share.train)
    assert not hasattr(model, "early_exit_heads")  # the probe ran on a copy

    # nothing to probe: a recipe that trains the backbone too, or too few rows for two sizes
    backbone = choose_share(
        model, train, labels, validation, val_labels, dataclasses.replace(common, first=64, method="pabee")
    )
    assert "trains the backbone too" in backbone.reason and len(backbone.calibration) == 375
    few = choose_share(model, train, labels, validation, val_labels, dataclasses.replace(common, first=1024))
    assert "too few rows to probe" in few.reason and len(few.calibration) == 375


def test_past_the_last_doubling_the_probe_weighs_the_fixed_share_before_taking_it(classifier):  # noqa: F811
    # 1,500 rows probed up to 1,024; a fixed share of 2% would leave 30 rows to certify, too few for anything at
    # 5%: the probe keeps the 1,024 rows it read and certifies on the other 476
    model, train, labels, validation, val_labels = _share_rows(classifier)
    settings = dataclasses.replace(SHARE, fraction=0.02, first=512)
    share = choose_share(model, train, labels, validation, val_labels, settings)
    assert [rows for rows, _ in share.probe] == [512, 1024]
    assert len(share.train) == 1024 and len(share.calibration) == 476
    assert "1470 rows' fewer calibration rows would cost" in share.reason


def test_fit_reports_how_the_share_was_chosen(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(800, seed=34), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", "--max-drop", "5", "--epochs", "1") == 0
    printed = capsys.readouterr().out
    assert "calibration share chosen on the rows: mean layers the heads would keep certified" in printed
    assert "after training on 256 rows" in printed
    summary = json.loads((tmp_path / "out" / "eek_fit.json").read_text())
    assert summary["train_rows"] + summary["calibration_rows"] == 720
    assert summary["calibration_share"].startswith("calibration share chosen on the rows")
