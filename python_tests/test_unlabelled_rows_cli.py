"""``--unlabelled FILE`` on ``eek fit`` and ``eek calibrate`` (issue 62): unseen rows without labels in the
certificate beside the labelled ones; a calibration file with empty label cells counts them the same way.
Bad input gets one line saying what to change."""

import json

import pytest
from conftest import write_table as _write
from test_fit_cli import _frame, _run, classifier  # noqa: F401 - classifier is a fixture

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")


def _fit(classifier, tmp_path, *extra):  # noqa: F811
    train = _write(_frame(200, seed=40), tmp_path / "train.csv")
    calibration = _write(_frame(500, seed=41), tmp_path / "calibration.csv")
    out = tmp_path / "fitted"
    code = _run("fit", classifier, train, out, "--calibration", calibration, "--max-drop", "5", "--epochs", "2", *extra)
    return code, out


def test_fit_certifies_with_the_unlabelled_rows_and_says_what_they_did(classifier, tmp_path, capsys):  # noqa: F811
    unlabelled = _write(_frame(900, seed=42, labels=None), tmp_path / "traffic.parquet")
    code, out = _fit(classifier, tmp_path, "--unlabelled", unlabelled)
    assert code == 0
    printed = capsys.readouterr().out
    certificate = json.loads((out / "eek_fit.json").read_text())["certificate"]
    assert certificate["rows"] == 500 and certificate["unlabelled_rows"] == 900
    # on this tiny task both certificates keep layer 1 on a draw of the validation rows: a tie keeps the labelled
    # rows alone, and the report says so with both figures
    assert certificate["unlabelled_use"] == (
        "on the 20 validation rows, drawn as many as the calibration rows, the labelled rows alone certify 1.00 "
        "mean layers and with the unlabelled ones 1.00"
    )
    assert "the 900 unlabelled rows were not used" in printed
    assert "900 unlabelled rows" in printed


def test_empty_label_cells_of_the_calibration_file_are_unlabelled_rows(classifier, tmp_path):  # noqa: F811
    train = _write(_frame(200, seed=40), tmp_path / "train.csv")
    frame = _frame(800, seed=43)
    frame.loc[500:, "label"] = None
    calibration = _write(frame, tmp_path / "partly.csv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--calibration", calibration, "--max-drop", "5", "--epochs", "2") == 0
    certificate = json.loads((out / "eek_fit.json").read_text())["certificate"]
    assert (certificate["rows"], certificate["unlabelled_rows"]) == (500, 300)


def test_calibrate_takes_unlabelled_rows_too(classifier, tmp_path, capsys):  # noqa: F811
    code, out = _fit(classifier, tmp_path)
    assert code == 0
    rows = _write(_frame(500, seed=44), tmp_path / "rows.csv")
    unlabelled = _write(_frame(700, seed=45, labels=None), tmp_path / "more.csv")
    assert _run("calibrate", out, rows, "--unlabelled", unlabelled, "--force", "--no-progress") == 0
    saved = json.loads((out / "eek_fit.json").read_text())
    assert saved["certificate"]["unlabelled_rows"] == 700 and saved["calibration_rows"] == 500
    assert "700 unlabelled rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("other columns", "error: --unlabelled: "),
        ("uncertified", "error: unlabelled rows (--unlabelled) join the certificate: give a --confidence"),
    ],
)
def test_unlabelled_rows_that_cannot_serve_say_what_to_change(classifier, tmp_path, capsys, case, message):  # noqa: F811
    frame = _frame(300, seed=46, labels=None)
    if case == "other columns":
        frame = frame.rename(columns={"text": "sentence"})
    unlabelled = _write(frame, tmp_path / "more.csv")
    extra = ("--confidence", "off") if case == "uncertified" else ()
    code, _ = _fit(classifier, tmp_path, "--unlabelled", unlabelled, *extra)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    if case == "other columns":
        assert "has no column 'text'" in err
