"""Offline replay makes the engine's decisions; calibration meets its target on the data it was given."""

import sys

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import candidates, plot_curve, print_curve
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.calibration.select import Goal, accuracy_curve, interpolate_baseline, static_baseline
from earlyexit_kernels.training.calibrate_model import calibrate, record_exits

POLICIES = [
    eek.Entropy(0.9),
    eek.Entropy(0.5, normalized=True),
    eek.MaxProb(0.5),
    eek.Patience(1),
    eek.QExit(0.3),
    eek.Voting(2),
    eek.DACT(),
    eek.SkipGates(skip_threshold=0.5, entropy_threshold=0.9),
]


def _model(policy, seed=0):
    model = tiny_model("bert", num_layers=5, seed=seed)
    eek.patch(model, policy, backend="torch")
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # random, distinct heads, gates and halting heads so that exits vary
        for p in model.early_exit_heads.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def _data(seed=0, batches=3):
    out = []
    for i in range(batches):
        ids, mask, tt = tiny_batch(16, 12, seed=seed * 10 + i)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt, "labels": ids[:, 1] % 3})
    return out


@pytest.mark.exact
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
def test_replay_reproduces_the_all_exits_forward_exactly(policy):
    model = _model(policy)
    data = _data()
    record = record_exits(model, data)
    for candidate in candidates(record, count=8)[:6]:
        eek.patch(model, candidate, backend="torch")
        with torch.no_grad():
            outs = [model(**{k: v for k, v in b.items() if k != "labels"}, return_all_exits=True) for b in data]
        result = replay(candidate, record)
        assert torch.equal(result.exit_layer, torch.cat([o.exit_layer for o in outs]))
        assert torch.equal(result.layers_run, torch.cat([o.layers_run for o in outs]))
        assert torch.equal(result.logits, torch.cat([o.logits for o in outs]).float())
    if isinstance(policy, eek.SkipGates):
        assert record.all_skipped.any()


@pytest.mark.parametrize("policy", [eek.Entropy(0.5), eek.Patience(1), eek.QExit(), eek.Voting(1)], ids=str)
def test_calibration_meets_its_targets_on_the_validation_data(policy):
    model = _model(policy, seed=1)
    val = _data(seed=2, batches=4)
    labels = torch.cat([b["labels"] for b in val])
    record = record_exits(model, val)
    full = (record.all_logits[-1].argmax(-1) == labels).float().mean().item()

    def measure(chosen):
        eek.patch(model, chosen, backend="torch")
        with torch.no_grad():
            outs = [model(**{k: v for k, v in b.items() if k != "labels"}, return_all_exits=True) for b in val]
        pred = torch.cat([o.logits for o in outs]).argmax(-1)
        return (pred == labels).float().mean().item(), torch.cat([o.layers_run for o in outs]).float().mean().item()

    for max_drop in (0.0, 5.0, 30.0):
        result = calibrate(record, max_drop=max_drop)
        accuracy, layers = measure(result.policy)
        assert result.met and result.full_accuracy == pytest.approx(full)
        assert accuracy == pytest.approx(result.accuracy) and layers == pytest.approx(result.mean_layers)
        assert accuracy >= full - max_drop / 100 - 1e-9
        # nothing on the curve that meets the target is cheaper
        assert all(p.mean_layers >= layers - 1e-9 for p in result.curve if p.accuracy >= full - max_drop / 100)
    result = calibrate(record, target_layers=3.0)
    accuracy, layers = measure(result.policy)
    assert result.met and layers <= 3.0 and accuracy == pytest.approx(result.accuracy)
    assert all(p.accuracy <= accuracy + 1e-9 for p in result.curve if p.mean_layers <= 3.0)


def test_calibrate_from_a_model_prints_and_plots(tmp_path, capsys):
    model = _model(eek.Entropy(0.5))
    plot = tmp_path / "curve.png"
    result = calibrate(model, _data(), max_drop=1.0, verbose=True, plot=str(plot))
    printed = capsys.readouterr().out
    assert "chosen: Entropy(" in printed and "layers" in printed
    assert plot.stat().st_size > 1000
    assert isinstance(result.policy, eek.Entropy)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(model, _data(), max_drop=1.0, target_layers=2.0)


def test_calibrate_takes_a_goal_or_its_fields_once():
    record = record_exits(_model(eek.Entropy(0.5)), _data())
    by_goal = calibrate(record, goal=Goal(max_drop=5.0, min_saving=0.0))
    by_fields = calibrate(record, max_drop=5.0, min_saving=0.0)
    assert (by_goal.policy, by_goal.mean_layers, by_goal.target) == (
        by_fields.policy,
        by_fields.mean_layers,
        by_fields.target,
    )
    with pytest.raises(TypeError, match="goal= or its fields as keywords \\(max_drop\\), not both"):
        calibrate(record, goal=Goal(max_drop=5.0), max_drop=1.0)
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) max_dorp: its goal's fields are"):
        calibrate(record, max_dorp=1.0)
    with pytest.raises(TypeError, match="goal must be a calibration.select.Goal, got dict"):
        calibrate(record, goal={"max_drop": 1.0})


def test_plot_is_skipped_cleanly_without_matplotlib(tmp_path, monkeypatch):
    record = record_exits(_model(eek.Patience(1)), _data())
    curve = accuracy_curve(record, candidates(record))
    print_curve(curve)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib"):
        assert plot_curve(curve, str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()


def test_static_baseline_and_interpolation():
    record = record_exits(_model(eek.Entropy(0.5)), _data())
    baseline = static_baseline(record)
    assert [k for k, _ in baseline] == [1, 2, 3, 4, 5]
    assert interpolate_baseline(baseline, 2.0) == pytest.approx(baseline[1][1])
    assert interpolate_baseline(baseline, 2.25) == pytest.approx(0.75 * baseline[1][1] + 0.25 * baseline[2][1])
