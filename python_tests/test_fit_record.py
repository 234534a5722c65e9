"""``eek_fit.json`` through :class:`~earlyexit_kernels.patching.fit_record.FitRecord`: today's folders load
unchanged, a folder saved again differs by its ``version`` alone, a later version is refused with a message.

The folder fitted before the record existed is ``python_tests/data/fitted_before_record/``
(``test_fitted_folder_before_record.py`` says how it was made, and checks that it still serves).
"""

import json
from pathlib import Path

import pytest
from conftest import write_table as _write
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture

from earlyexit_kernels.integrations.model_folder import certified_base, fit_certificate
from earlyexit_kernels.integrations.recertify_folder import saved_path
from earlyexit_kernels.patching.fit_record import FILE, VERSION, FitRecord, FitRecordError

BEFORE = Path(__file__).parent / "data" / "fitted_before_record"


def test_a_record_written_before_the_version_field_loads_as_version_1():
    record = FitRecord.load(BEFORE)
    saved = json.loads((BEFORE / FILE).read_text())
    assert "version" not in saved and record.version == 1 == VERSION
    assert record.source_model == saved["source_model"] and record.policy == "Entropy(0.5867)"
    assert record.target == "agreement" and record.certificate == saved["certificate"]
    assert record.certified_path == saved["certified_path"] and len(record.certified_path) == 401
    assert record.base == "as saved" and [r["rows"] for r in record.recalibrations] == [700]
    assert "base" not in record.report and "recalibrations" not in record.report


def test_saved_again_the_file_differs_by_its_version_line_alone(tmp_path):
    FitRecord.load(BEFORE).save(tmp_path)
    before = (BEFORE / FILE).read_text().splitlines()
    after = (tmp_path / FILE).read_text().splitlines()
    assert after == [before[0], '  "version": 1,', *before[1:]]


def test_a_fit_and_a_calibrate_write_todays_keys_in_todays_order_after_the_version(classifier, tmp_path):  # noqa: F811
    train = _write(_frame(200, seed=22), tmp_path / "train.csv")
    unseen = _write(_frame(700, seed=23, labels=None), tmp_path / "unseen.csv")
    out = tmp_path / "fitted"
    assert _run("fit", classifier, train, out, "--calibration", unseen, "--max-drop", "5", "--epochs", "2") == 0
    todays = list(json.loads((BEFORE / FILE).read_text()))
    fitted = json.loads((out / FILE).read_text())
    assert list(fitted) == ["version", *(k for k in todays if k not in ("base", "recalibrations"))]
    assert fitted["version"] == VERSION and fitted["source_model"] == classifier
    again = _write(_frame(700, seed=24, labels=None), tmp_path / "again.csv")
    assert _run("calibrate", out, again, "--force", "--no-progress") == 0
    calibrated = json.loads((out / FILE).read_text())
    assert list(calibrated) == ["version", *todays]
    assert calibrated["recalibrations"][0]["source"] == again and calibrated["base"] == "as saved"
    assert FitRecord.load(out).recalibrations == calibrated["recalibrations"]


def _write_record(folder: Path, **fields) -> Path:
    saved = json.loads((BEFORE / FILE).read_text())
    (folder / FILE).write_text(json.dumps({**fields, **saved}))
    return folder


@pytest.mark.parametrize("reader", [FitRecord.load, FitRecord.read, fit_certificate, saved_path, certified_base])
def test_a_later_version_is_refused_by_every_reader_with_what_to_do(tmp_path, reader):
    folder = _write_record(tmp_path, version=VERSION + 1)
    with pytest.raises(FitRecordError, match=f"version {VERSION + 1}, written by a later earlyexit_kernels.*upgrade"):
        reader(str(folder))


@pytest.mark.parametrize("version", ["1", 0, True, 1.5])
def test_a_version_that_is_no_whole_number_from_1_says_so(tmp_path, version):
    folder = _write_record(tmp_path, version=version)
    with pytest.raises(FitRecordError, match="a fit record's version is a whole number from 1"):
        FitRecord.load(folder)


@pytest.mark.parametrize("text", [None, "{not json", "[1, 2]"])
def test_no_record_or_an_unreadable_one_is_none_to_readers_and_an_error_to_load(tmp_path, text):
    if text is not None:
        (tmp_path / FILE).write_text(text)
    assert FitRecord.read(tmp_path) is None and fit_certificate(str(tmp_path)) is None
    assert saved_path(str(tmp_path)) is None and certified_base(str(tmp_path)) is None
    with pytest.raises(FitRecordError, match=str(tmp_path / FILE)):
        FitRecord.load(tmp_path)
