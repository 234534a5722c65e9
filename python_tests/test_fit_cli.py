"""``eek fit MODEL TRAIN_FILE OUTPUT_DIR`` and ``eek evaluate MODEL FILE``: a data file in, a served model out."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import word_bert, word_texts, write_table
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main
from earlyexit_kernels.training.labelled_texts import (
    DataError,
    LabelledTexts,
    encode,
    label_ids,
    length_sorted_batches,
    split_rows,
)

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")
pytest.importorskip("pyarrow", reason="the command line reads tables through pyarrow")

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = {0: "neg", 1: "pos"}


# one torch thread for the module's tests, given back after (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _label_of(text: str) -> str:
    """The task: "pos" when the text has more words of the first half of the vocabulary."""
    words = text.split()
    first = sum(int(w[1:]) < 30 for w in words)
    return "pos" if 2 * first > len(words) else "neg"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A plain (unpatched) tiny BERT classifier folder with named labels and its tokenizer."""
    path = tmp_path_factory.mktemp("plain")
    model, tokenizer = word_bert(path, 2, labels=LABELS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _frame(count: int, seed: int, labels: str | None = "names"):
    texts = [t or "w1" for t in word_texts(count, seed=seed, longest=20)]
    frame = pd.DataFrame({"id": range(count), "text": texts})
    if labels == "names":
        frame["label"] = [_label_of(t) for t in texts]
    elif labels == "ids":
        frame["label"] = [int(_label_of(t) == "pos") for t in texts]
    return frame


def _run(*argv):
    return main([str(a) for a in argv])


# The tests of reading, training and writing run the uncertified calibration: their files are
# too small to certify a budget (the certified fit has its own tests below).
FAST = ("--epochs", "2", "--no-progress", "--confidence", "off")


def _accuracy_of(folder: str, frame) -> tuple[float, float]:
    """(accuracy, mean layers) of the saved early-exit model on ``frame``, one text at a time."""
    model = eek.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    right, layers = 0, 0
    with torch.no_grad():
        for text, label in zip(frame.text, frame.label):
            out = model(**tokenizer(text, return_tensors="pt"))
            right += model.config.id2label[int(out.logits.argmax())] == label
            layers += int(out.layers_run)
    return right / len(frame), layers / len(frame)


def test_fit_writes_a_calibrated_folder_that_classify_and_evaluate_load(classifier, tmp_path, capsys):
    train = write_table(_frame(160, seed=1), tmp_path / "train.csv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, *FAST) == 0
    printed = capsys.readouterr().out
    assert "on 144 rows and calibrated them on 16 validation rows" in printed  # 10% of 160 held out by default
    assert "chosen: Entropy(" in printed and "mean layers of 4" in printed
    summary = json.loads((out / "eek_fit.json").read_text())
    assert summary["method"] == "heads" and summary["target"] == "accuracy" and summary["train_rows"] == 144
    model = eek.from_pretrained(str(out))
    assert eek.policy_of(model).to_code(4) == summary["policy"]
    assert not any(p.name.startswith(".fitted") for p in tmp_path.iterdir())  # no temporary folder left

    test = write_table(_frame(60, seed=2), tmp_path / "test.parquet")
    unlabelled = write_table(pd.read_parquet(test).drop(columns="label"), tmp_path / "unlabelled.parquet")
    assert _run("classify", out, unlabelled, tmp_path / "pred.csv", "--no-progress") == 0
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 60
    capsys.readouterr()
    assert _run("evaluate", out, test, "--label-column", "label", "--no-progress", "--batch-size", 7) == 0
    printed = capsys.readouterr().out
    accuracy, layers = _accuracy_of(str(out), pd.read_parquet(test))
    assert f"accuracy: {100 * accuracy:.2f}%" in printed
    assert f"mean layers run: {layers:.2f} of 4" in printed
    assert "exit layer histogram:" in printed and "layer  4:" in printed
    assert "sequences/s" in printed and "full model, same batches" not in printed


def test_without_labels_the_heads_learn_the_model_s_answers_and_agreement_is_calibrated(classifier, tmp_path, capsys):
    frame = _frame(120, seed=3, labels=None)
    train = write_table(frame, tmp_path / "train.jsonl")
    validation = write_table(_frame(40, seed=4, labels=None), tmp_path / "val.parquet")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--validation", validation, *FAST) == 0
    captured = capsys.readouterr()
    assert "has no column 'label': the heads learn the model's own predictions" in captured.err
    assert "agreement with the full model on validation" in captured.out
    summary = json.loads((out / "eek_fit.json").read_text())
    assert summary["target"] == "agreement" and summary["validation_rows"] == 40 and summary["train_rows"] == 120
    assert summary["accuracy"] >= 0.99 - 0.01 * 1.0  # --max-drop 1 point of agreement (full agrees with itself)

    assert _run("evaluate", out, train, "--compare", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "agreement with the full model:" in printed and "accuracy:" not in printed
    assert "full model, same batches:" in printed and "speed-up" in printed


def test_the_same_seed_fits_the_same_heads_and_leaves_torch_s_generator_as_it_was(classifier, tmp_path):
    from safetensors.torch import load_file

    train = write_table(_frame(120, seed=3, labels=None), tmp_path / "train.jsonl")
    validation = write_table(_frame(40, seed=4, labels=None), tmp_path / "val.jsonl")
    heads = []
    for run in ("a", "b"):
        torch.manual_seed(100 + ord(run))  # the caller's own draws differ between the runs
        before = torch.random.get_rng_state()
        assert _run("fit", classifier, train, tmp_path / run, "--validation", validation, *FAST) == 0
        assert torch.equal(torch.random.get_rng_state(), before)
        heads.append(load_file(str(tmp_path / run / "early_exit_heads.safetensors")))
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][name], heads[1][name]) for name in heads[0])


def test_fit_trains_heads_that_read_the_head_below_and_the_folder_runs_them(classifier, tmp_path, capsys):
    train = write_table(_frame(120, seed=6), tmp_path / "train.csv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--pooling", "mean", "--head", "cascade", *FAST) == 0
    summary = json.loads((out / "eek_fit.json").read_text())
    assert (summary["pooling"], summary["head"]) == ("mean", "cascade")
    model = eek.from_pretrained(str(out))
    assert eek.head_config(model).head == "cascade"
    assert any(h.below.weight.abs().sum() > 0 for h in model.early_exit_heads.classifiers[1:]), "B_i learnt"
    capsys.readouterr()
    test = write_table(_frame(40, seed=7), tmp_path / "test.csv")
    assert _run("evaluate", out, test, "--label-column", "label", "--no-progress") == 0
    accuracy, layers = _accuracy_of(str(out), pd.read_csv(test))
    assert f"mean layers run: {layers:.2f} of 4" in capsys.readouterr().out


def test_labels_as_class_ids_and_a_validation_split(classifier, tmp_path, capsys):
    train = write_table(_frame(100, seed=5, labels="ids"), tmp_path / "train.tsv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--validation-split", "0.25", "--method", "fastbert", *FAST) == 0
    summary = json.loads((out / "eek_fit.json").read_text())
    assert (summary["train_rows"], summary["validation_rows"], summary["method"]) == (75, 25, "fastbert")
    assert summary["stages"][0].startswith("fastbert (heads")


def test_a_joint_method_trains_the_backbone_and_keeps_its_policy_family(classifier, tmp_path):
    train = write_table(_frame(64, seed=6), tmp_path / "train.csv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--method", "pabee", *FAST) == 0
    model = eek.from_pretrained(str(out))
    assert type(eek.policy_of(model)).__name__ == "Patience"
    plain = BertForSequenceClassification.from_pretrained(classifier)
    # PABEE trains the backbone too: the saved weights are not the original ones
    assert not torch.equal(
        model.bert.encoder.layer[0].output.dense.weight, plain.bert.encoder.layer[0].output.dense.weight
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("no text column", "has no column 'sentence' (--text-column); its columns are ['id', 'text', 'label']"),
        ("unreadable file", "cannot read"),
        ("unknown format", "unknown format .txt"),
        ("labels not the model's", "which are neither the model's label names ('neg', 'pos'"),
        ("missing label column", "has no column 'gold' (--label-column)"),
        ("a method that needs labels", "--method pabee trains with labels"),
        ("not a classifier", "not a sequence classifier"),
        ("not a folder", "is not a folder"),
        ("output exists", "exists; pass --overwrite"),
        ("bad split", "--validation-split must lie strictly between 0 and 1"),
        ("too few rows to certify", "even a model that never errs needs 299 rows"),
        ("confidence out of range", "confidence must be a probability strictly between 0 and 1"),
        ("bad calibration fraction", "--calibration-fraction must lie strictly between 0 and 1"),
    ],
)
def test_bad_input_is_one_clear_line_and_status_2(classifier, tmp_path, capsys, case, message):
    frame = _frame(40, seed=7)
    data = write_table(frame, tmp_path / "train.csv")
    model, output, extra = classifier, tmp_path / "out", []
    if case == "no text column":
        extra = ["--text-column", "sentence"]
    elif case == "unreadable file":
        data = tmp_path / "broken.parquet"
        data.write_bytes(b"not a parquet file at all")
    elif case == "unknown format":
        data = tmp_path / "train.txt"
        data.write_text("text\nw1\n")
    elif case == "labels not the model's":
        frame["label"] = ["good" if label == "pos" else "bad" for label in frame.label]
        data = write_table(frame, tmp_path / "renamed.jsonl")
    elif case == "missing label column":
        extra = ["--label-column", "gold"]
    elif case == "a method that needs labels":
        data = write_table(frame.drop(columns="label"), tmp_path / "unlabelled.csv")
        extra = ["--method", "pabee"]
    elif case == "not a classifier":
        model = tmp_path / "encoder"
        BertModel.from_pretrained(classifier).save_pretrained(model)
        BertTokenizerFast.from_pretrained(classifier).save_pretrained(model)
    elif case == "not a folder":
        model = tmp_path / "nothing"
    elif case == "output exists":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    elif case == "bad split":
        extra = ["--validation-split", "1.5"]
    elif case == "too few rows to certify":
        extra = ["--confidence", "0.95"]
    elif case == "confidence out of range":
        extra = ["--confidence", "1.5"]
    elif case == "bad calibration fraction":
        extra = ["--confidence", "0.9", "--calibration-fraction", "0"]
    capsys.readouterr()  # what the set-up printed (a weights' loading bar, where no command has turned it off yet)
    assert _run("fit", model, data, output, *FAST, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    if case == "output exists":
        assert (output / "keep.txt").read_text() == "mine"


def test_evaluate_refuses_labels_of_another_task(classifier, tmp_path, capsys):
    train = write_table(_frame(60, seed=8), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "fitted", *FAST) == 0
    other = write_table(pd.DataFrame({"text": ["w1 w2", "w3"], "label": ["spam", "ham"]}), tmp_path / "other.csv")
    capsys.readouterr()
    assert _run("evaluate", tmp_path / "fitted", other, "--no-progress") == 2
    assert "holds the labels 'ham', 'spam', which are neither" in capsys.readouterr().err


def test_labels_are_names_or_class_ids():
    config = BertConfig(num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    data = LabelledTexts(["x"] * 3, None, ["c", "a", "b"], "f.csv", "label")
    assert label_ids(data, config).tolist() == [2, 0, 1]
    data.labels = ["2", "0", "1"]  # a CSV file's ids are text
    assert label_ids(data, config).tolist() == [2, 0, 1]
    data.labels = [2, 0, 1]
    assert label_ids(data, config).tolist() == [2, 0, 1]
    data.labels = [3, 0, 1]
    with pytest.raises(DataError, match="nor class ids 0..2"):
        label_ids(data, config)
    data.labels = ["a", None, "b"]
    with pytest.raises(DataError, match="1 rows have no label"):
        label_ids(data, config)


def test_the_validation_split_is_fixed_by_its_seed_and_disjoint():
    rest, held = split_rows(50, 0.2, seed=3)
    assert (rest, held) == split_rows(50, 0.2, seed=3) and held != split_rows(50, 0.2, seed=4)[1]
    assert len(held) == 10 and sorted(rest + held) == list(range(50))
    with pytest.raises(DataError, match="leaves 0 validation"):
        split_rows(3, 0.1)


def test_length_sorted_batches_keep_each_row_s_tokens(classifier):
    tokenizer = BertTokenizerFast.from_pretrained(classifier)
    texts = word_texts(23, seed=9)
    encoded = encode(tokenizer, LabelledTexts(texts, None, None, "f"), max_length=12)
    assert encoded.truncated == sum(len(tokenizer(t)["input_ids"]) > 12 for t in texts) > 0
    batches = length_sorted_batches(encoded, torch.arange(23), batch_size=5)
    assert [len(b["rows"]) for b in batches] == [5, 5, 5, 5, 3]
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    for batch in batches:
        assert torch.equal(batch["labels"], batch["rows"])
        for row, ids, mask in zip(batch["rows"], batch["input_ids"], batch["attention_mask"]):
            assert ids[mask.bool()].tolist() == encoded.input_ids[row]


def test_batches_carry_token_types_only_where_the_tokenizer_gives_them():
    """A family without token types (DistilBERT, ModernBERT, MPNet) refuses even zeros: none are made up."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from earlyexit_kernels.training.labelled_texts import Encoded

    encoded = Encoded([[0, 7, 9, 2], [0, 8, 2]], None, 0, 12, 1)
    batches = length_sorted_batches(encoded, torch.tensor([0, 1]), batch_size=2)
    assert "token_type_ids" not in batches[0] and batches[0]["input_ids"].tolist() == [[0, 7, 9, 2], [0, 8, 2, 1]]
    config = MPNetConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = MPNetForSequenceClassification._from_config(config).eval()
    result = eek.training.fit_exit_heads(model, batches * 2, batches, max_drop=50.0, progress=False)
    assert result.calibration.num_layers == 2


def test_fit_as_a_command(classifier, tmp_path, capsys):
    train = write_table(_frame(80, seed=10), tmp_path / "train.csv")
    out = tmp_path / "fitted"
    command = [sys.executable, "-m", "earlyexit_kernels", "fit", classifier, train, str(out), *FAST]
    fit = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert fit.returncode == 0, fit.stderr
    assert "chosen:" in fit.stdout and (out / "eek_fit.json").is_file()
    assert "Traceback" not in fit.stderr
    assert _run("evaluate", out, train, "--compare", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "speed-up" in printed
    assert _run("evaluate", out, tmp_path / "absent.csv") == 2
    assert capsys.readouterr().err.startswith("error: input")


def test_the_command_line_offers_every_recipe_and_head_form():
    """The fit methods are named once (``earlyexit_kernels._method_names``, free of torch): the
    command line, the fit and the training package read that one tuple, one recipe per name."""
    from earlyexit_kernels import _method_names, training
    from earlyexit_kernels.engine.step.heads import HEAD_FORMS
    from earlyexit_kernels.integrations.fit_cli import HEAD_CHOICES, METHODS, UNLABELLED_METHODS
    from earlyexit_kernels.training import fit_texts
    from earlyexit_kernels.training.recipes import RECIPES

    assert METHODS == tuple(RECIPES)
    assert UNLABELLED_METHODS == tuple(name for name, r in RECIPES.items() if not r.needs_labels)
    for module in (fit_texts, training):
        assert (module.METHODS, module.UNLABELLED_METHODS) == (METHODS, UNLABELLED_METHODS)
        assert module.METHODS is _method_names.METHODS
    assert HEAD_CHOICES == ("auto", *HEAD_FORMS)


def test_by_default_fit_certifies_the_budget_on_rows_kept_out_of_training(classifier, tmp_path, capsys):
    train = write_table(_frame(800, seed=11), tmp_path / "train.parquet")
    out = tmp_path / "certified"
    quarter = ("--calibration-fraction", "0.25")  # the measured share has its own test (test_calibration_rows.py)
    assert _run("fit", classifier, train, out, "--max-drop", "5", "--epochs", "2", "--no-progress", *quarter) == 0
    printed = capsys.readouterr().out
    # 10% of 800 for validation (early stopping), a quarter of the other 720 kept out for calibration
    assert "on 540 rows and calibrated them on 180 calibration rows kept out of training" in printed
    assert "with confidence 95% (exchangeable rows) on 180 calibration rows" in printed
    summary = json.loads((out / "eek_fit.json").read_text())
    assert summary["confidence"] == 0.95 and summary["calibration_rows"] == 180 and summary["train_rows"] == 540
    certificate = summary["certificate"]
    assert certificate["budget"] == 0.05 and certificate["rows"] == 180
    if certificate["certified"]:
        assert certificate["bound"] <= 0.05 and summary["mean_layers"] < 4
    else:  # says what would, never a silent full depth
        assert summary["mean_layers"] > 3.99 and "no early exit certified" in printed
    assert eek.policy_of(eek.from_pretrained(str(out))).to_code(4) == summary["policy"]


def test_fit_with_the_expected_guarantee_records_it_and_calibrate_keeps_it(classifier, tmp_path, capsys):
    train = write_table(_frame(800, seed=11), tmp_path / "train.parquet")
    out = tmp_path / "expected"
    quarter = ("--calibration-fraction", "0.25")
    argv = ("--max-drop", "5", "--epochs", "2", "--no-progress", "--guarantee", "expected", *quarter)
    assert _run("fit", classifier, train, out, *argv) == 0
    assert "in expectation over the draw of the calibration rows" in capsys.readouterr().out
    certificate = json.loads((out / "eek_fit.json").read_text())["certificate"]
    assert certificate["guarantee"] == "expected" and certificate["test"] == "conformal risk control"
    rows = write_table(_frame(400, seed=12), tmp_path / "rows.csv")
    assert _run("calibrate", out, rows, "--force") == 0  # no --guarantee: the folder's own
    assert "in expectation" in capsys.readouterr().out
    assert json.loads((out / "eek_fit.json").read_text())["certificate"]["guarantee"] == "expected"
    assert _run("calibrate", out, rows, "--guarantee", "probable", "--force") == 0
    assert "with confidence 95%" in capsys.readouterr().out
    assert json.loads((out / "eek_fit.json").read_text())["certificate"]["guarantee"] == "probable"


def test_the_command_line_writes_what_fit_folder_writes(classifier, tmp_path, capsys):
    """``eek fit`` reads its files and calls ``fit_folder``, which a program calls the same way, with a FitConfig or
    its fields: the three folders hold the same policy and the same heads, byte for byte."""
    from earlyexit_kernels.integrations.fit_folder import fit_folder
    from earlyexit_kernels.training.fit_config import FitConfig
    from earlyexit_kernels.training.labelled_texts import LabelledTexts

    frame = _frame(120, seed=4)
    train_file = write_table(frame, tmp_path / "train.csv")
    assert _run("fit", classifier, train_file, tmp_path / "cli", *FAST, "--validation", train_file) == 0
    capsys.readouterr()
    rows = LabelledTexts(list(frame.text), None, list(frame.label), str(train_file), "label")
    settings = dict(epochs=2, confidence=None, seed=0, progress=False)
    fit_folder(classifier, rows, rows, str(tmp_path / "config"), config=FitConfig(**settings))
    fit_folder(classifier, rows, rows, str(tmp_path / "options"), **settings)
    with pytest.raises(TypeError, match="not both"):
        fit_folder(classifier, rows, rows, str(tmp_path / "both"), config=FitConfig(), seed=1)
    written = [
        {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.suffix in (".safetensors", ".json")}
        for name in ("cli", "config", "options")
    ]
    assert written[0]["model.safetensors"] == written[1]["model.safetensors"] == written[2]["model.safetensors"]
    policies = [json.loads(w["eek_fit.json"])["policy"] for w in written]
    assert policies[0] == policies[1] == policies[2]
