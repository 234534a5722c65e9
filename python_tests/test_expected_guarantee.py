"""``guarantee="expected"`` (``--guarantee expected``): conformal risk control, a budget held on average over the
draw of the calibration rows, beside the default ``"probable"`` one (with probability ``confidence``).

The walk is the probable one's path, stopping at the first candidate whose adjusted risk ``(n x observed + 1) /
(n + 1)`` passes the budget; it never skips to a more aggressive candidate that passes again. What it promises
is checked in ``test_certificate_redraws.py``, by re-drawing the calibration rows through ``certify`` itself: the
mean risk of what is served stays within the budget (by 2.6 standard errors), while single draws serve above it
often.
"""

import json

import pytest
import torch

from earlyexit_kernels.calibration.certify import GUARANTEES, certify, expected_index
from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.training.calibrate_model import calibrate


def _population(rows: int, seed: int) -> ExitRecord:
    """Heads that grow surer and righter with depth on rows of random difficulty, three labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows,), generator=g)
    difficulty = torch.rand(rows, generator=g)
    logits = torch.zeros(4, rows, 3)
    for k in range(4):
        margin = 4.0 * ((k + 1) / 4 - difficulty) + 0.8 * torch.randn(rows, generator=g)
        right = margin > -0.3 if k < 3 else torch.rand(rows, generator=g) < 0.9
        other = (labels + torch.randint(1, 3, (rows,), generator=g)) % 3
        logits[k, torch.arange(rows), torch.where(right, labels, other)] = 0.5 + margin.abs() * 2
    return ExitRecord(logits, labels, None, None, Entropy(0.3))


def test_the_walk_stops_at_the_first_candidate_whose_adjusted_risk_passes_the_budget():
    losses = [torch.zeros(99), torch.tensor([1.0] * 3 + [0.0] * 96), torch.tensor([1.0] * 9 + [0.0] * 90)]
    losses.append(torch.zeros(99))  # passes again: never reached
    # adjusted: (0 + 1) / 100 = 0.01, (3 + 1) / 100 = 0.04, (9 + 1) / 100 = 0.10
    assert expected_index(lambda i: losses[i], 4, 0.05) == 1
    assert expected_index(lambda i: losses[i], 4, 0.005) == -1


def test_the_certificate_says_what_each_guarantee_promises_and_what_the_other_would_serve():
    record = _population(4_000, seed=2).subset(torch.arange(1_500))
    probable = certify(record, 0.03, 0.95, target="agreement", steps=60)[1]
    expected = certify(record, 0.03, 0.95, target="agreement", steps=60, guarantee="expected")[1]
    assert (probable.guarantee, expected.guarantee) == ("probable", "expected")
    assert expected.test == "conformal risk control" and probable.test == "exact binomial"
    assert expected.mean_layers <= probable.mean_layers  # the expectation is the cheaper promise
    assert expected.other_layers == pytest.approx(probable.mean_layers)
    assert probable.other_layers == pytest.approx(expected.mean_layers)
    assert "in expectation over the draw of the calibration rows" in expected.describe()
    assert "with confidence 95%" in probable.describe()
    assert set(GUARANTEES) == {"probable", "expected"}
    with pytest.raises(ValueError, match="guarantee must be one of probable, expected"):
        certify(record, 0.03, 0.95, target="agreement", guarantee="likely")


def test_calibrate_takes_the_guarantee_and_names_it_in_its_target():
    record = _population(2_000, seed=5)
    result = calibrate(record, max_drop=3.0, confidence=0.9, target="agreement", guarantee="expected")
    assert result.certificate.guarantee == "expected" and "in expectation" in result.target


def test_a_folder_certified_in_expectation_is_not_re_certified_online(tmp_path):
    """Online re-certification certifies with a probability: it would change what the folder promises, so the
    serving paths leave it off and say how to keep the guarantee (offline, on the audited rows)."""
    from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate
    from earlyexit_kernels.patching.fit_record import FitRecord

    folder = tmp_path / "folder"
    folder.mkdir()
    certificate = {"budget": 0.01, "confidence": 0.95, "risk": "r", "rows": 400, "certified": True}
    fields = {"certificate": {**certificate, "guarantee": "expected"}, "target": "agreement", "policy": "Entropy(0.1)"}
    (folder / "eek_fit.json").write_text(json.dumps(fields))
    assert FitRecord.read(str(folder)) is not None
    certificate_, why = resolve_online_certificate(str(folder), Entropy(0.1), None, fraction=0.05)
    assert certificate_ is None and "holds in expectation" in why and "--from-audit" in why
