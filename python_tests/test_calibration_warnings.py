"""Calibration tells the truth: it warns with the numbers when heads are at chance or the policy saves little,
stays quiet for good heads, and calibrates against agreement with the full model without labels."""

import warnings

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import compact_curve, print_curve
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.training.calibrate_model import CalibrationWarning, calibrate, record_exits

LAYERS, ROWS = 4, 400


def _labels(seed=0):
    """60% of the rows are class 0."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(ROWS, generator=generator) < 0.4).long()


def _record(internal: str, labels=None, with_labels=True, seed=0) -> ExitRecord:
    """A record of 4 layers: a final head right on 95% of the rows, internal heads ``"chance"``
    (always class 0, the majority) or ``"good"``: layer k agrees with the final head on 85%, 90%,
    95% of the rows, confident (margin 1..6) where it agrees and unsure (0..1.5) where not."""
    labels = _labels(seed) if labels is None else labels
    generator = torch.Generator().manual_seed(seed + 1)

    def uniform(low, high):
        return low + (high - low) * torch.rand(ROWS, generator=generator)

    wrong = torch.rand(ROWS, generator=generator) > 0.95
    final_prediction = torch.where(wrong, 1 - labels, labels)
    final = torch.nn.functional.one_hot(final_prediction, 2).float() * 4.0
    if internal == "chance":
        inner = torch.tensor([0.4, 0.0]).expand(LAYERS - 1, ROWS, 2).clone()
        inner[..., 0] += 0.05 * torch.rand(LAYERS - 1, ROWS, generator=generator)
    else:
        layers = []
        for agree_fraction in (0.85, 0.90, 0.95):
            agree = torch.rand(ROWS, generator=generator) < agree_fraction
            predicted = torch.where(agree, final_prediction, 1 - final_prediction)
            margin = torch.where(agree, uniform(1.0, 6.0), uniform(0.0, 1.5))
            layers.append(torch.nn.functional.one_hot(predicted, 2).float() * margin[:, None])
        inner = torch.stack(layers)
    all_logits = torch.cat([inner, final[None]])
    return ExitRecord(all_logits, labels if with_labels else None, None, None, eek.Entropy(0.3))


def test_heads_at_chance_warn_with_the_numbers_and_mark_the_result():
    with pytest.warns(CalibrationWarning) as caught:
        result = calibrate(_record("chance"), max_drop=1.0)
    messages = [str(w.message) for w in caught]
    chance = next(m for m in messages if "at chance" in m)
    majority = 100 * (_labels() == 0).sum().item() / ROWS
    assert "3 of 3 internal heads" in chance and f"{majority:.1f}%" in chance and "layer 1:" in chance
    little = next(m for m in messages if "saves" in m)
    assert "runs 4.00 of 4 layers" in little and "saves 0.0%" in little and "min_saving=10%" in little
    assert (
        result.heads_at_chance == [1, 2, 3] and result.saves_little and result.chance == pytest.approx(majority / 100)
    )
    assert result.met and result.mean_layers == 4.0  # the target is met... at full depth, and it says so
    assert result.warnings == messages
    assert "warning: calibrate:" in result.summary()


def test_good_heads_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        result = calibrate(_record("good"), max_drop=1.0)
    assert result.heads_at_chance == [] and not result.saves_little and result.warnings == []
    assert result.mean_layers < 3.0 and result.saved_fraction > 0.25
    assert all(score > 0.8 for score in result.layer_scores)


def test_the_thresholds_are_parameters():
    record = _record("good")
    # the good policy saves less than 90% of the layers: asking for that warns
    with pytest.warns(CalibrationWarning, match="less than min_saving=90%"):
        assert calibrate(record, max_drop=1.0, min_saving=0.9).saves_little
    # a margin above the heads' lead over chance (over 80% against 60%) calls them at chance
    with pytest.warns(CalibrationWarning, match="3 of 3 internal heads"):
        assert calibrate(record, max_drop=1.0, chance_margin=0.5).heads_at_chance == [1, 2, 3]
    with pytest.raises(ValueError, match="min_saving"):
        calibrate(record, max_drop=1.0, min_saving=1.5)


def test_agreement_needs_no_labels_and_keeps_its_promise():
    record = _record("good", with_labels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        result = calibrate(record, max_drop=1.0)  # target="auto" without labels: agreement
    assert result.measure == "agreement" and result.full_accuracy == 1.0
    decided = replay(result.policy, record).logits.argmax(-1)
    agreement = (decided == record.all_logits[-1].argmax(-1)).float().mean().item()
    assert agreement == pytest.approx(result.accuracy) and agreement >= 0.99
    assert result.mean_layers < 4.0
    with pytest.raises(ValueError, match="target='agreement'"):
        calibrate(record, max_drop=1.0, target="accuracy")
    with pytest.raises(ValueError, match="target must be one of"):
        calibrate(record, max_drop=1.0, target="f1")


def test_agreement_from_a_model_and_batches_without_labels():
    model = eek.patch(tiny_model("bert", num_layers=LAYERS), eek.Patience(1), backend="torch")
    data = []
    for seed in range(3):
        ids, mask, _ = tiny_batch(8, 10, seed=seed)
        data.append({"input_ids": ids, "attention_mask": mask})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # random heads: whatever they say
        result = calibrate(model, data, max_drop=5.0)
    assert result.measure == "agreement" and result.full_accuracy == 1.0
    assert result.accuracy >= 0.95 - 1e-9 and isinstance(result.policy, eek.Patience)
    assert record_exits(model, data).labels is None


def test_a_metric_plugs_in():
    def balanced_accuracy(logits, references):
        predicted = logits.argmax(-1)
        return sum((predicted[references == c] == c).float().mean().item() for c in (0, 1)) / 2

    record = _record("chance")
    with pytest.warns(CalibrationWarning, match="balanced_accuracy"):
        result = calibrate(record, max_drop=1.0, metric=balanced_accuracy)
    assert result.measure == "balanced_accuracy"
    assert result.layer_scores[0] == pytest.approx(0.5) and result.chance == pytest.approx(0.5)


def test_the_printed_curve_is_compact(capsys):
    record = _record("good")
    result = calibrate(record, max_drop=1.0, count=200, verbose=True)
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("Entropy(")]
    assert 2 <= len(table) <= 13 < len(result.curve)
    assert "chosen: Entropy(" in printed and "per-layer accuracy: 1:" in printed
    points = compact_curve(result.curve, rows=5)
    layers = [p.mean_layers for p in points]
    assert len(points) <= 5 and layers == sorted(layers)
    assert min(layers) == min(p.mean_layers for p in result.curve)
    print_curve(points)
