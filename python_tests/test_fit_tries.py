"""``eek fit --tries N``: N fits at seeds SEED, SEED+1, ..., each certified at a Bonferroni share of the confidence,
the one of the fewest certified layers kept, and the choice holds at the confidence asked (issue 108).

- The rule (:mod:`earlyexit_kernels.training.fit_tries`): the share, the choice, the refusals.
- Its re-draw test: calibration rows drawn again and again from one population on which four fits' heads answer
  (one full model, four sets of heads), recorded in production's order, each fit certified by ``certify`` and the
  try kept by the functions ``fit_folder`` keeps it with. Kept at the Bonferroni share, the kept policy's population
  risk is over the budget on at most 5% of the draws; kept among fits certified at the full confidence, often more.
- The command: ``eek fit --tries 2`` writes the kept try, the same folder a one-try fit at its seed and share writes,
  and says what each try certified.
"""

import json
import types

import pytest
import torch
from conftest import write_table
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture

from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.risk_control import upper_bound
from earlyexit_kernels.training.fit_config import FitConfig, FitError
from earlyexit_kernels.training.fit_texts import fit_model
from earlyexit_kernels.training.fit_tries import (
    describe_tries,
    describe_try,
    kept_try,
    try_confidence,
    try_config,
    try_summary,
)
from earlyexit_kernels.training.labelled_texts import order_by_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _entry(certified: bool, layers: float, seed: int = 0) -> dict:
    return {"seed": seed, "confidence": 0.975, "certified": certified, "mean_layers": layers}


def test_each_try_is_certified_at_a_bonferroni_share_of_the_confidence():
    assert try_confidence(0.95, 1) == 0.95
    assert try_confidence(0.95, 2) == pytest.approx(0.975)
    assert try_confidence(0.9, 4) == pytest.approx(0.975)
    config = try_config(FitConfig(seed=7, tries=3, confidence=0.95), 2)
    assert (config.seed, config.tries) == (9, 1) and config.confidence == pytest.approx(1 - 0.05 / 3)


def test_the_kept_try_certified_the_fewest_layers_the_first_on_a_tie_and_the_first_where_none_certified():
    assert kept_try([_entry(True, 3.1), _entry(True, 2.4), _entry(True, 2.9)]) == 1
    assert kept_try([_entry(True, 2.4), _entry(True, 2.4)]) == 0
    # a try that certified nothing runs the full depth, whatever its curve's mean layers on the rows
    assert kept_try([_entry(True, 3.1), _entry(False, 1.0)]) == 0
    assert kept_try([_entry(False, 6.0), _entry(False, 6.0)]) == 0
    tries = [_entry(True, 2.48, seed=0), _entry(True, 3.41, seed=1), _entry(False, 6.0, seed=2)]
    assert describe_try(tries[0]) == "seed 0 certified 2.48 mean layers at 97.5%"
    assert describe_try(tries[2]) == "seed 2 certified no early exit at 97.5%"
    assert describe_tries(tries, kept_try(tries), 0.95, 6) == (
        "tries (mean layers of 6, each certified at 97.5%): seed 0 2.48, seed 1 3.41, seed 2 none certified; kept "
        "seed 0, the fewest: it holds at 95% (the chance that any try's certificate fails is at most 5%)"
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(tries=2, confidence=None), "needs a certificate: give a --confidence"),
        (dict(tries=2, guarantee="expected"), "use --guarantee probable"),
        (dict(tries=0), "--tries must be a whole number from 1 to 8"),
    ],
)
def test_tries_are_refused_where_no_probable_certificate_can_hold_the_choice(fields, words):
    with pytest.raises(FitError, match=words):
        FitConfig(**fields)


def test_fit_model_fits_once_and_says_what_runs_the_tries():
    with pytest.raises(FitError, match="fit_folder .* runs the tries"):
        fit_model(None, None, None, None, FitConfig(tries=2))


LAYERS, POPULATION, ROWS, DRAWS, FITS = 4, 40_000, 300, 500, 4
CONFIDENCE = 0.95
#: where each fit's population risk (accuracy lost) passes between two neighbours of its 13-point grid (from 1.83-2.39%
#: to 2.56-3.40%), so that some candidate of every fit is near the limit
BUDGET = 0.025


def _fits(rows: int, seed: int) -> tuple[list[ExitRecord], torch.Tensor]:
    """``(records, lengths)``: one population's rows answered by :data:`FITS` fits of heads. Each row's evidence for
    its label grows layer by layer with noise of each fit's heads' own (the same rows, the same full model: the
    last layer, shared), a head answers its sign and is as sure as it is large; rows of little evidence are long
    (the evidence walk of ``test_certificate_redraws.py``)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (rows,), generator=g)
    evidence = 2.0 + 2.0 * torch.randn(rows, generator=g)
    full = evidence * LAYERS**0.5 + LAYERS**0.5 * torch.randn(rows, generator=g)
    lengths = (40 - 12 * evidence + 8 * torch.randn(rows, generator=g)).clamp(4, 256).round().long()
    records = []
    for _ in range(FITS):
        steps = evidence / LAYERS + 1.5 / LAYERS**0.5 * torch.randn(LAYERS, rows, generator=g)
        seen = torch.cumsum(steps, 0) * LAYERS / torch.arange(1, LAYERS + 1).reshape(-1, 1) ** 0.5
        seen[-1] = full
        answers = torch.where(seen > 0, labels, 1 - labels)
        logits = torch.zeros(LAYERS, rows, 2)
        logits.scatter_(2, answers.unsqueeze(-1), seen.abs().unsqueeze(-1))
        records.append(ExitRecord(logits, labels, None, None, Entropy(0.3)))
    return records, lengths


def _tries(records: list[ExitRecord], picked: torch.Tensor, confidence: float, grid: list) -> list[tuple[dict, int]]:
    """Each fit certified at ``confidence`` on the rows ``picked`` (in production's order): ``(its summary as
    fit_folder writes it, the grid index of its policy)``."""
    tries = []
    for seed, record in enumerate(records):
        chosen, certificate, _ = certify(record.subset(picked), BUDGET, confidence, target="accuracy", steps=12)
        report = types.SimpleNamespace(
            certificate=certificate.as_dict(), confidence=confidence, mean_layers=chosen.mean_layers, calibration_rows=0
        )
        tries.append((try_summary(report, seed), grid.index(chosen.policy)))
    return tries


def _kept(tries: list[tuple[dict, int]]) -> tuple[int, int, float]:
    """``(fit, grid index, mean layers)`` of the try kept among ``tries``, as ``fit_folder`` keeps one."""
    kept = kept_try([summary for summary, _ in tries])
    return kept, tries[kept][1], tries[kept][0]["mean_layers"]


#: the figures when written (500 draws): kept at the share, 2.00% of the draws over the budget (99% lower bound
#: 0.83%) at 2.801 mean layers on the draws' rows; kept among fits certified at the full 95%, 8.00% over, at 2.481;
#: the first fit alone, 1.40% over, at 2.893. The thresholds midway: 6.5% between 8.00% and the 5% a valid choice
#: may show, and 0.046 layers between the 0.092 the choice saved and none
NAIVE_OVER = 0.065
FEWER_LAYERS = 0.046


def test_the_kept_try_holds_the_confidence_over_500_draws_and_a_choice_without_the_share_does_not():
    records, lengths = _fits(POPULATION, seed=3)
    grid = certified_candidates(records[0].policy, LAYERS, 2, steps=12)
    risks = [
        torch.stack([row_losses(replay(policy, record).logits, record, "accuracy") for policy in grid]).double().mean(1)
        for record in records
    ]
    g = torch.Generator().manual_seed(4)
    over = {"share": 0, "full": 0, "one fit": 0}
    layers = {"share": 0.0, "full": 0.0, "one fit": 0.0}
    for _ in range(DRAWS):
        picked = torch.randint(0, POPULATION, (ROWS,), generator=g)
        picked = picked[torch.tensor(order_by_length(lengths[picked]))]  # as production records them: longest first
        at_full = _tries(records, picked, CONFIDENCE, grid)
        for name, tries in (
            ("share", _tries(records, picked, try_confidence(CONFIDENCE, FITS), grid)),
            ("full", at_full),
            ("one fit", at_full[:1]),  # the first fit alone: its certificate at the full confidence, as above
        ):
            fit, index, mean_layers = _kept(tries)
            over[name] += bool(risks[fit][index] > BUDGET)
            layers[name] += mean_layers / DRAWS
    lower = 1.0 - upper_bound(DRAWS - over["share"], DRAWS, 0.99)  # the exact 99% lower bound of the violation rate
    print(
        "\n"
        + "; ".join(f"{name}: {over[name] / DRAWS:.2%} over the budget, {layers[name]:.3f} layers" for name in over)
        + f" (the share's 99% lower bound {lower:.2%})"
    )
    assert lower <= 1.0 - CONFIDENCE
    assert over["full"] / DRAWS > NAIVE_OVER
    assert layers["share"] < layers["one fit"] - FEWER_LAYERS


def test_eek_fit_tries_writes_the_kept_try_as_one_fit_at_its_seed_and_share_writes_it(classifier, tmp_path, capsys):  # noqa: F811
    # without labels: the heads learn the full model's answers, and agreement with them is certified
    train = write_table(_frame(800, seed=11, labels=None), tmp_path / "train.parquet")
    settings = ("--max-drop", "5", "--epochs", "2", "--no-progress", "--calibration-fraction", "0.25")
    assert _run("fit", classifier, train, tmp_path / "tries", *settings, "--tries", "2") == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "tries" / "eek_fit.json").read_text())
    tries = summary["tries"]
    assert [entry["seed"] for entry in tries] == [0, 1]
    assert all(entry["confidence"] == pytest.approx(0.975) for entry in tries)
    kept = tries[kept_try(tries)]
    assert summary["mean_layers"] == kept["mean_layers"]
    assert (
        "tries (mean layers of 4, each certified at 97.5%): seed 0 " in printed
        and f"kept seed {kept['seed']}" in printed
    )
    # the certificate holds at the confidence asked (what eek calibrate and the server certify its path at again)
    certificate = summary["certificate"]
    assert summary["confidence"] == certificate["confidence"] == 0.95 and certificate["chosen_among"] == 2
    assert (
        certificate["certified"]
        and "with confidence 95% (exchangeable rows) on 180 calibration rows, kept among 2 tries each bounded at 97.5%"
        in printed
    )
    # the same folder as one fit at the kept seed, certified at the share
    one = ("--seed", str(kept["seed"]), "--confidence", "0.975")
    assert _run("fit", classifier, train, tmp_path / "one", *settings, *one) == 0
    written = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("tries", "one")]
    assert written[0] == written[1]
    assert json.loads((tmp_path / "one" / "eek_fit.json").read_text())["policy"] == summary["policy"]
    # certified anew on other rows, its one path fixed: at the confidence asked, no choice any more
    rows = write_table(_frame(400, seed=12, labels=None), tmp_path / "rows.csv")
    assert _run("calibrate", tmp_path / "tries", rows, "--force", "--no-progress") == 0
    assert "with confidence 95% (exchangeable rows) on 400 calibration rows" in capsys.readouterr().out
    again = json.loads((tmp_path / "tries" / "eek_fit.json").read_text())["certificate"]
    assert again["confidence"] == 0.95 and again["chosen_among"] is None


def test_a_fit_without_a_certificate_refuses_tries_before_reading_a_row(classifier, tmp_path, capsys):  # noqa: F811
    assert _run("fit", classifier, tmp_path / "missing.csv", tmp_path / "out", *FAST, "--tries", "3") == 2
    assert "--tries 3 keeps the try that certifies the fewest layers" in capsys.readouterr().err


def test_tries_on_int8_time_the_runtimes_once_and_fit_every_try_on_the_layers_chosen(
    classifier,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from earlyexit_kernels.engine.layers import runtime_choice
    from earlyexit_kernels.patching.fit_record import FitRecord

    timed = []
    choose = runtime_choice.choose_int8_layers

    def counted(*args, **kwargs):
        timed.append(choose(*args, **kwargs))
        return timed[-1]

    monkeypatch.setattr(runtime_choice, "choose_int8_layers", counted)
    train = write_table(_frame(800, seed=11, labels=None), tmp_path / "train.parquet")
    settings = ("--max-drop", "5", "--epochs", "2", "--no-progress", "--calibration-fraction", "0.25")
    assert _run("fit", classifier, train, tmp_path / "int8", *settings, "--tries", "2", "--dtype", "int8") == 0
    record = FitRecord.load(tmp_path / "int8")
    assert len(timed) == 1 and [entry["seed"] for entry in record.report["tries"]] == [0, 1]
    assert record.int8_layers["by"] == "timed" and record.int8_recipe == timed[0].recipe


def test_calibration_rows_too_few_for_the_share_say_that_the_tries_ask_for_more(classifier, tmp_path, capsys):  # noqa: F811
    from earlyexit_kernels.training.fit_config import least_rows_to_certify

    # enough rows to certify at 95%, too few at the 97.5% each of two tries is certified at
    rows = (least_rows_to_certify(5.0, 0.95) + least_rows_to_certify(5.0, 0.975)) // 2
    train = write_table(_frame(300, seed=11, labels=None), tmp_path / "train.parquet")
    calibration = write_table(_frame(rows, seed=12, labels=None), tmp_path / "calibration.parquet")
    argv = ("--max-drop", "5", "--epochs", "2", "--no-progress", "--calibration", calibration)
    assert _run("fit", classifier, train, tmp_path / "one", *argv) == 0
    assert _run("fit", classifier, train, tmp_path / "tries", *argv, "--tries", "2") == 2
    error = capsys.readouterr().err
    assert f"{rows} calibration rows (--calibration) cannot certify" in error
    assert "(--tries 2 certifies each try at confidence 0.975, so that the one kept holds at 0.95" in error
