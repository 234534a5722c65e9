"""``eek fit --dtype int8``: exit heads fitted on the int8 encoder they are served on, their threshold
certified on that base against the float32 full model the user validated, and a folder that keeps
the float32 weights and records the base its certificate holds for."""

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_model
from conftest import write_table as _write
from safetensors.torch import load_file
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture
from test_training_defaults import _data

import earlyexit_kernels as eek
from earlyexit_kernels.engine.layers import precision
from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.integrations.model_folder import load_model
from earlyexit_kernels.patching.fit_record import FitRecord
from earlyexit_kernels.training import fit_exit_heads
from earlyexit_kernels.training.calibrate_model import record_exits

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(model, reference=None, **options):
    """``fit_exit_heads`` on the tiny task, calibrated on 96 rows of their own."""
    return fit_exit_heads(
        model,
        _data(batches=6),
        _data(batches=2, seed=5),
        calibration_batches=_data(batches=12, seed=7),
        progress=False,
        reference=reference,
        **options,
    )


def _reference(model):
    """A patched copy of ``model`` (a reference is a patched model), its heads drawn aside from the global
    generator so that the fit beside it draws what it would alone."""
    with torch.random.fork_rng():
        return eek.patch(copy.deepcopy(model), eek.Entropy(0.3))


def _flipped(model):
    """A patched copy of ``model`` whose final classifier answers another class: a full model unlike ``model``'s."""
    other = _reference(model)
    with torch.no_grad():
        other.classifier.weight.copy_(other.classifier.weight.roll(1, dims=0))
        other.classifier.bias.copy_(other.classifier.bias.roll(1, dims=0))
    return other


@pytest.mark.parametrize("confidence", [None, 0.8])
def test_a_reference_on_the_model_s_own_base_changes_nothing(confidence):
    """The reference's answers are matched to the calibration rows in their order: the model itself as
    its reference gives the same calibration and certificate as none."""
    options = {"max_drop": 20.0, "confidence": confidence}
    alone = _fit(tiny_model("bert", seed=3), **options)
    model = tiny_model("bert", seed=3)
    beside = _fit(model, reference=_reference(model), **options)
    assert beside.policy == alone.policy
    for name in ("accuracy", "full_accuracy", "mean_layers"):
        assert getattr(beside.calibration, name) == pytest.approx(getattr(alone.calibration, name)), name
    if confidence is not None:
        # the same certificate but for the seed of its row order, drawn from the OS's entropy each time
        drawn = {"order_seed"}
        certified = [
            {k: v for k, v in r.calibration.certificate.as_dict().items() if k not in drawn} for r in (beside, alone)
        ]
        assert certified[0] == certified[1]


def test_the_calibration_measures_against_the_reference_s_full_depth():
    model = tiny_model("bert", seed=3)
    reference = _flipped(model)
    result = _fit(model, reference=reference, max_drop=20.0)
    calibration = _data(batches=12, seed=7)
    answers = record_exits(reference, calibration).all_logits[-1].argmax(-1)
    labels = torch.cat([batch["labels"] for batch in calibration])
    right = float((answers == labels).double().mean())
    own = float((record_exits(model, calibration).all_logits[-1].argmax(-1) == labels).double().mean())
    assert right != pytest.approx(own)  # the check can tell the two full models apart
    assert result.calibration.full_accuracy == pytest.approx(right)


def test_a_recipe_that_trains_the_encoder_is_refused_beside_a_reference():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="trains the encoder too"):
        _fit(model, reference=_reference(model), method="pabee")


# certified at 10 points on 200 calibration rows of their own: the tiny task's files certify that
CERTIFIED = ("--epochs", "2", "--no-progress", "--max-drop", "10")


@pytest.fixture(scope="module")
def folders(classifier, tmp_path_factory):  # noqa: F811
    """The same certified fit on float32 and on int8: (float32 folder, int8 folder, the int8 fit's output)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("int8-fit")
    train = _write(_frame(300, seed=41), root / "train.csv")
    calibration = ("--calibration", _write(_frame(200, seed=43), root / "calibration.csv"))
    assert _run("fit", classifier, train, root / "float32", *CERTIFIED, *calibration) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        argv = ("fit", classifier, train, root / "int8", *CERTIFIED, *calibration, "--dtype", "int8", "--device", "cpu")
        assert _run(*argv) == 0
    return root / "float32", root / "int8", out.getvalue()


def test_the_folder_keeps_the_float32_weights_and_heads_fitted_on_int8(folders, classifier):  # noqa: F811
    float32, int8, _ = folders
    source = load_file(f"{classifier}/model.safetensors")
    written = load_file(int8 / "model.safetensors")
    assert set(source) <= set(written)
    for name, tensor in source.items():
        assert torch.equal(written[name], tensor), name  # the int8 layers were put back as saved
    heads = load_file(int8 / "early_exit_heads.safetensors")
    on_float = load_file(float32 / "early_exit_heads.safetensors")
    assert set(heads) == set(on_float)
    assert any(not torch.equal(heads[k], on_float[k]) for k in heads)  # the same fit read other hidden states


def test_the_folder_records_the_int8_base_and_serves_on_it(folders):
    _, int8, printed = folders
    record = FitRecord.load(int8)
    load_model(str(int8))  # loads on its own base
    assert record.base == "int8" and record.int8_recipe == record.int8_layers["recipe"]  # timed on this CPU
    assert record.int8_recipe in {precision.INT8_LAYERS[name] for name in precision.INT8_LAYERS}
    assert record.int8_isa == int8_isa()  # fitted and certified on this CPU's int8 kernels
    assert record.base_risk == "reference"  # against the float32 full model, as eek calibrate --dtype int8's default
    assert "fitted and certified on the int8 base" in printed and f"eek serve {int8} --dtype int8" in printed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served on the base it was certified on: no warning
        served = load_model(str(int8), dtype="int8")[0]
    assert served.eek_int8_recipe == record.int8_recipe
    with pytest.warns(UserWarning, match="certified on int8"):
        load_model(str(int8), dtype="float32")
    saved = json.loads((int8 / "eek_fit.json").read_text())
    assert saved["method"] == "heads" and saved["base"] == "int8" and saved["certificate"]["certified"]


def test_a_method_that_trains_the_encoder_is_refused_on_int8_before_any_work(classifier, tmp_path, capsys):  # noqa: F811
    train = _write(_frame(60, seed=42), tmp_path / "train.csv")
    out = tmp_path / "out"
    assert _run("fit", classifier, train, out, *FAST, "--dtype", "int8", "--method", "pabee") == 2
    err = capsys.readouterr().err
    assert "--method pabee trains the encoder too" in err and "eek calibrate OUTPUT_DIR FILE --dtype int8" in err
    assert not out.exists()


def test_a_fit_on_int8_re_certified_later_reads_the_risk_of_that_certificate():
    assert FitRecord(base="int8").base_risk == "reference"
    assert FitRecord(base="int8", recalibrations=[{"base": "float32"}]).base_risk is None
    assert FitRecord(base="int8", recalibrations=[{"base": "int8", "risk": "agreement"}]).base_risk == "agreement"
    assert FitRecord().base_risk is None and FitRecord(base="float32").base_risk is None


def test_a_model_not_in_float32_is_refused_with_what_to_do():
    from earlyexit_kernels.integrations.int8_fit import int8_base
    from earlyexit_kernels.training.fit_config import FitError

    model = eek.patch(tiny_model("bert"), eek.Entropy(0.3)).to(torch.bfloat16)
    with pytest.raises(FitError, match=r"saved in bfloat16: save it in float32 first"):
        with int8_base(model):
            pass
