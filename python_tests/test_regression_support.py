"""Regression heads (num_labels == 1): what trains and exits, and clear errors where a method has no regression form."""

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.methods.losses import OBJECTIVES
from earlyexit_kernels.training import train_exit_heads
from earlyexit_kernels.training.calibrate_model import calibrate, record_exits


def _batches(count=2):
    out = []
    for seed in range(count):
        ids, mask, _ = tiny_batch(6, 9, seed=seed)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.linspace(-1, 1, 6)})
    return out


def test_the_methods_without_a_regression_form_are_the_documented_ones():
    assert {name for name, o in OBJECTIVES.items() if not o.regression} == {"ensemble", "dact", "smartbert_stage1"}


@pytest.mark.parametrize("method", ["pabee", "deebert_stage1", "deebert_stage2", "fastbert", "smartbert_stage2"])
def test_squared_error_methods_train_a_regression_head(method):
    model = eek.patch(tiny_model("bert", num_labels=1), eek.Patience(1, regression_threshold=0.1), backend="torch")
    losses = train_exit_heads(model, _batches(), method=method, lr=1e-3, epochs=1, progress=False)
    assert len(losses) == 2 and all(loss >= 0 for loss in losses)


def test_palbert_trains_a_regression_head_with_qexit():
    model = eek.patch(tiny_model("bert", num_labels=1), eek.QExit(q=0.5), backend="torch")
    assert len(train_exit_heads(model, _batches(), method="palbert", lr=1e-3, progress=False)) == 2


@pytest.mark.parametrize("method", ["ensemble", "smartbert_stage1"])
def test_methods_without_a_regression_form_say_so_before_training(method):
    model = eek.patch(tiny_model("bert", num_labels=1), eek.Patience(1, regression_threshold=0.1), backend="torch")
    with pytest.raises(ValueError, match="regression head.*squared-error form are pabee"):
        train_exit_heads(model, _batches(), method=method, progress=False)


def test_skipgates_and_dact_refuse_a_regression_head_and_name_the_alternatives():
    for policy in (eek.SkipGates(entropy_threshold=0.3), eek.DACT()):
        with pytest.raises(ValueError, match="regression_threshold"):
            eek.patch(tiny_model("bert", num_labels=1), policy)


def test_calibrate_refuses_a_regression_head_and_its_suggestion_works():
    model = eek.patch(tiny_model("bert", num_labels=1), eek.Patience(1, regression_threshold=0.1), backend="torch")
    with pytest.raises(ValueError, match="regression head.*calibration.record.replay"):
        calibrate(model, _batches(), max_drop=1.0)
    # what the message suggests: replay candidate thresholds on one recording
    record = record_exits(model, _batches())
    never = replay(eek.Patience(1, regression_threshold=1e-12), record)
    always = replay(eek.Patience(1, regression_threshold=1e9), record)
    assert (never.exit_layer == 4).all() and (always.exit_layer == 2).all()
