"""A second budget beside accuracy lost: the answers changed against the full model (``max_changed``,
``eek calibrate --max-changed``).

Accuracy lost counts a row the exit gets wrong where the full model was right (+1) against one the exit gets
right where the full model was wrong (-1). Where the heads of early layers are about as accurate as the last
one, the two cancel: a threshold can lose no accuracy while changing many answers of the model the user
validated. ``max_changed`` certifies both: a candidate passes where the larger of its two p-values (the exact
paired test of accuracy lost, the exact binomial of the answers changed) is under ``1 - confidence``.
"""

import json

import pytest
import torch
from conftest import word_bert, word_texts
from conftest import write_table as _write
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.integrations.recertify_folder import calibrate_folder
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.risk_control import fixed_sequence, risk_p_value
from earlyexit_kernels.training.calibrate_model import calibrate
from earlyexit_kernels.training.labelled_texts import LabelledTexts

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")

LAYERS, ROWS = 4, 2_000


def _cancelling(rows: int = ROWS, seed: int = 0) -> ExitRecord:
    """Heads whose early answers are as accurate as the last one's, wrong on other rows: exits lose no accuracy
    and change many answers."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    logits = torch.zeros(LAYERS, rows, 2)
    for layer in range(LAYERS):
        right = torch.rand(rows, generator=g) < 0.8  # each head right on 80% of the rows, its own rows
        answer = torch.where(right, labels, 1 - labels)
        sure = 0.5 + (layer + 1) * torch.rand(rows, generator=g)
        logits[layer].scatter_(1, answer.unsqueeze(1), sure.unsqueeze(1))
    return ExitRecord(logits, labels, None, None, Entropy(0.3))


def _reference_index(record, grid, budget, max_changed, confidence) -> int:
    """The walk written out: the last candidate before the first whose larger p-value is not under the level."""

    def p_value(index: int) -> float:
        out = replay(grid[index], record)
        accuracy = risk_p_value(row_losses(out.logits, record, "accuracy"), budget, test="exact paired")
        changed = risk_p_value(row_losses(out.logits, record, "agreement"), max_changed, test="exact binomial")
        return max(accuracy, changed)

    return fixed_sequence(p_value, len(grid), 1.0 - confidence)


def test_the_answers_changed_are_certified_beside_accuracy_lost():
    record = _cancelling()
    grid = certified_candidates(record.policy, LAYERS, 2)
    alone, alone_certificate, _ = certify(record, 0.02, 0.95, target="accuracy")
    chosen, certificate, _ = certify(record, 0.02, 0.95, target="accuracy", max_changed=0.05)
    assert grid.index(chosen.policy) == _reference_index(record, grid, 0.02, 0.05, 0.95)
    changed = float(row_losses(replay(chosen.policy, record).logits, record, "agreement").mean())
    alone_changed = float(row_losses(replay(alone.policy, record).logits, record, "agreement").mean())
    # accuracy lost alone certifies a threshold that changes far more answers than 5%; the pair does not
    assert alone_changed > 0.10 and alone_certificate.changed_budget is None
    assert certificate.changed_observed == pytest.approx(changed) and certificate.changed_bound <= 0.05
    assert chosen.mean_layers > alone.mean_layers
    assert "(and answers changed against the full model <= 5%)" in certificate.describe()
    assert f"answers changed: observed {100 * changed:.2f}%" in certificate.describe()


def test_under_the_expected_guarantee_both_adjusted_risks_stay_within_their_budgets():
    record = _cancelling()
    _, certificate, _ = certify(record, 0.02, 0.95, target="accuracy", max_changed=0.05, guarantee="expected")
    assert certificate.certified and certificate.changed_bound <= 0.05 and certificate.bound <= 0.02
    assert "in expectation over the draw" in certificate.describe()
    assert "(and answers changed against the full model <= 5%)" in certificate.describe()


@pytest.mark.parametrize(
    "case, message",
    [
        ("agreement", "this certificate's risk is already disagreement with the full model"),
        ("unlabelled", "leave the unlabelled rows out, or max_changed"),
        ("fraction", "max_changed must be a fraction of rows in [0, 1)"),
    ],
)
def test_certify_refuses_a_second_budget_it_cannot_certify(case, message):
    record = _cancelling(600)
    options = {"target": "agreement" if case == "agreement" else "accuracy", "max_changed": 0.05}
    if case == "unlabelled":
        options["unlabelled"] = _cancelling(600, seed=1)
    if case == "fraction":
        options["max_changed"] = 5.0
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        certify(record, 0.01, 0.95, **options)


def test_calibrate_takes_the_second_budget_in_points_with_a_confidence_only():
    record = _cancelling()
    result = calibrate(record, max_drop=1.0, confidence=0.95, max_changed=5.0)
    assert result.certificate.changed_budget == pytest.approx(0.05)
    assert result.target.endswith("answers changed <= 5%")
    with pytest.raises(ValueError, match="give confidence= too"):
        calibrate(record, max_drop=1.0, max_changed=5.0)


def test_eek_calibrate_max_changed_is_saved_kept_and_dropped(classifier, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "model"
    train = _write(_frame(300, seed=31), tmp_path / "train.csv")
    assert _run("fit", classifier, train, folder, *FAST) == 0
    rows = _write(_frame(700, seed=32), tmp_path / "rows.csv")

    def saved() -> dict:
        return json.loads((folder / "eek_fit.json").read_text())["certificate"]

    capsys.readouterr()
    command = ("calibrate", folder, rows, "--max-drop", "20", "--force", "--no-progress")
    assert _run(*command, "--max-changed", "5") == 0
    assert "(and answers changed against the full model <= 5%)" in capsys.readouterr().out
    assert saved()["changed_budget"] == pytest.approx(0.05) and saved()["budget"] == pytest.approx(0.2)
    # the online audit and a start-up certificate on rows without labels read the answers changed alone: at the
    # smaller of the two budgets
    from earlyexit_kernels.integrations.model_folder import load_model
    from earlyexit_kernels.integrations.online_certificate import certificate_of_folder
    from earlyexit_kernels.integrations.served_certificate import certify_served

    assert certificate_of_folder(str(folder), fraction=0.5).budget == pytest.approx(0.05)
    model, tokenizer = load_model(str(folder))
    texts = list(_frame(700, seed=34, labels=None).text)
    served = certify_served(model, tokenizer, str(folder), LabelledTexts(texts, None, None, "rows.csv"))
    assert served.report.target == "agreement" and served.report.certificate["budget"] == pytest.approx(0.05)
    assert _run(*command) == 0  # a re-certification keeps the folder's second budget
    assert saved()["changed_budget"] == pytest.approx(0.05)

    # rows without labels cannot certify accuracy lost: the saved second budget says how to go on
    unlabelled = _write(_frame(700, seed=33, labels=None), tmp_path / "unlabelled.csv")
    assert _run("calibrate", folder, unlabelled, "--max-drop", "5", "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-changed is certified beside accuracy lost") and "--max-changed off" in err
    assert _run(*command, "--max-changed", "off") == 0
    assert saved()["changed_budget"] is None


def test_on_the_int8_base_the_answers_changed_are_counted_against_the_float32_full_model(tmp_path):
    """``eek calibrate --dtype int8 --max-changed``: both risks read the saved float32 full model, so the int8
    base's own changes and the exits' count together in the answers changed, as the report's agreement says."""
    pytest.importorskip("torch.ao.quantization", reason="int8 needs torch's quantized engine")
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model, tokenizer = word_bert(tmp_path, 3, labels=labels, initializer_range=0.3)  # answers vary with the text
    eek.patch(model, eek.Entropy(0.0))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = [t or "w1" for t in word_texts(1_200, seed=7)]
    rows = LabelledTexts(texts, None, [labels[len(t.split()) % 3] for t in texts], "rows.csv", "label")
    report = calibrate_folder(
        str(tmp_path), rows, max_drop=5.0, confidence=0.9, dtype="int8", max_changed=12.0, force=True
    )
    certificate = report.certificate
    assert (report.base, report.base_risk, certificate["changed_budget"]) == ("int8", "reference", 0.12)
    assert certificate["changed_observed"] == pytest.approx(1.0 - report.agreements["exits"])
    assert report.agreements["base_full"] < 1.0  # the int8 base changes answers of its own, counted in
    assert json.loads((tmp_path / "eek_fit.json").read_text())["certificate"]["changed_budget"] == 0.12


def test_eek_fit_max_changed_is_certified_and_recorded_and_a_bad_one_refused(classifier, tmp_path, capsys):  # noqa: F811
    """``eek fit --max-changed``: the budget ``eek calibrate`` takes, carried by the FitConfig to the certificate
    (``eek_fit.json`` records it); a value out of bounds, without a confidence or without labels is one line."""
    train = _write(_frame(300, seed=35), tmp_path / "train.csv")
    fit = ("fit", classifier, train, tmp_path / "model", "--epochs", "2", "--no-progress", "--max-drop", "20")
    kept = ("--confidence", "0.95", "--calibration-fraction", "0.25")
    assert _run(*fit, *kept, "--max-changed", "5") == 0
    certificate = json.loads((tmp_path / "model" / "eek_fit.json").read_text())["certificate"]
    assert certificate["changed_budget"] == pytest.approx(0.05) and certificate["budget"] == pytest.approx(0.2)
    unlabelled = _write(_frame(300, seed=36, labels=None), tmp_path / "unlabelled.csv")
    for extra, message in (
        (("--max-changed", "150"), "max_changed must be in [0, 100) points (answers changed), got 150.0"),
        (("--max-changed", "5", "--confidence", "off"), "max_changed is certified beside accuracy lost"),
        (("--unlabelled", str(unlabelled), "--max-changed", "5"), "--max-changed is certified beside accuracy lost"),
    ):
        capsys.readouterr()
        assert _run(*fit, "--overwrite", *kept[:2], *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_fit_model_and_fit_exit_heads_take_max_changed_with_the_same_bound():
    from earlyexit_kernels.training.fit import fit_exit_heads
    from earlyexit_kernels.training.fit_config import FitConfig
    from earlyexit_kernels.training.fit_texts import FitError

    assert FitConfig(max_changed=5.0).max_changed == 5.0 and FitConfig().max_changed is None
    with pytest.raises(FitError, match=r"max_changed must be in \[0, 100\) points"):
        FitConfig(max_changed=-1.0)
    with pytest.raises(ValueError, match=r"max_changed must be in \[0, 100\) points"):  # before anything trains
        fit_exit_heads(None, [], max_changed=150.0, confidence=0.95)
    with pytest.raises(ValueError, match="give confidence= too"):
        fit_exit_heads(None, [], max_changed=5.0)
