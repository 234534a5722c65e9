"""Every bad value of each fit setting is refused in the same words by every entry point that takes it: ``eek fit``
and ``eek calibrate`` (run in-process, through the command line's main), ``fit_model`` and ``fit_exit_heads`` (and
``calibrate_folder`` and ``train_exit_heads`` where they take the setting); and
each keyword entry point's defaults are its settings object's (issue 97).

The words are those of the settings object (:class:`FitConfig`, whose parts :class:`Training` and the calibration's
``Goal`` check each field once); every entry point refuses before it reads a row or loads a model, so the rows and
models given here are never opened.

The audit's settings likewise: :class:`AuditConfig`'s words come from ``AuditWatch``, ``ServeSettings`` and ``eek
serve``'s flags."""

import dataclasses
import inspect

import pytest

from earlyexit_kernels.engine.entry.audit import AuditConfig, AuditWatch
from earlyexit_kernels.integrations.cli import main
from earlyexit_kernels.integrations.recertify_folder import calibrate_folder
from earlyexit_kernels.training.calibrate_texts import calibrate_texts
from earlyexit_kernels.training.fit import HeadsFit, fit_exit_heads
from earlyexit_kernels.training.fit_config import FitConfig, FitError, Training
from earlyexit_kernels.training.fit_texts import fit_model
from earlyexit_kernels.training.train import train_exit_heads

# (setting, bad value, the entry points that take it); the parser's own choices refuse a bad --guarantee at the
# command line (argparse's words), so the command lines are left out of its row
BAD = [
    ("max_drop", -1.0, {"eek fit", "eek calibrate", "fit_model", "fit_exit_heads"}),
    ("max_drop", float("nan"), {"fit_model", "fit_exit_heads"}),
    ("lr", 0.0, {"eek fit", "fit_model", "fit_exit_heads"}),
    ("lr", -1e-3, {"eek fit", "fit_model", "fit_exit_heads", "train_exit_heads"}),
    ("epochs", 0, {"eek fit", "fit_model", "fit_exit_heads", "train_exit_heads"}),
    ("epochs", 2.5, {"fit_model", "fit_exit_heads", "train_exit_heads"}),
    ("confidence", 1.5, {"eek fit", "eek calibrate", "fit_model", "fit_exit_heads"}),
    ("confidence", 0.0, {"eek fit", "eek calibrate", "fit_model", "fit_exit_heads"}),
    ("batch_size", 0, {"eek fit", "eek calibrate", "fit_model", "calibrate_folder", "train_exit_heads"}),
    ("max_length", 0, {"eek fit", "eek calibrate", "fit_model", "calibrate_folder"}),
    ("max_length", -5, {"eek fit", "eek calibrate", "fit_model", "calibrate_folder"}),
    ("tries", 0, {"eek fit", "fit_model"}),
    ("tries", 9, {"eek fit", "fit_model"}),
    ("tries", 2.5, {"fit_model"}),
    ("guarantee", "sure", {"fit_model", "fit_exit_heads"}),
    ("max_changed", 100.0, {"eek fit", "eek calibrate", "fit_model", "fit_exit_heads"}),
    ("max_changed", -1.0, {"eek fit", "eek calibrate", "fit_model", "fit_exit_heads"}),
]


def _words(name, value) -> str:
    """The settings object's refusal of ``name=value``: the words every entry point must give."""
    with pytest.raises(ValueError) as refused:
        FitConfig(**{name: value})
    return str(refused.value)


def _command(capsys, *argv) -> str:
    status = main([str(a) for a in argv])
    assert status == 2, argv
    return capsys.readouterr().err


def _refusal(entry, name, value, tmp_path, capsys) -> str:
    flag = "--" + name.replace("_", "-")
    if entry == "eek fit":
        return _command(capsys, "fit", tmp_path / "model", tmp_path / "train.csv", tmp_path / "out", flag, value)
    if entry == "eek calibrate":
        return _command(capsys, "calibrate", tmp_path / "folder", tmp_path / "rows.csv", flag, value)
    if entry == "fit_model":
        call = lambda: fit_model(None, None, None, None, **{name: value})  # noqa: E731
    elif entry == "calibrate_folder":  # its Recalibration, before the folder is read
        call = lambda: calibrate_folder(str(tmp_path / "folder"), None, **{name: value})  # noqa: E731
    elif entry == "train_exit_heads":  # its TrainSettings, before the model is looked at
        call = lambda: train_exit_heads(None, [], **{name: value})  # noqa: E731
    else:  # max_changed is certified beside a confidence, which fit_exit_heads leaves off by default
        extra = {"confidence": 0.95} if name == "max_changed" else {}
        call = lambda: fit_exit_heads(None, [], **{name: value}, **extra)  # noqa: E731
    with pytest.raises(ValueError) as refused:
        call()
    return str(refused.value)


@pytest.mark.parametrize(("name", "value", "entries"), BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_each_bad_setting_is_refused_in_the_same_words_everywhere(name, value, entries, tmp_path, capsys):
    words = _words(name, value)
    assert name in words and repr(value) in words or str(value) in words, words  # it names the setting and value
    for entry in sorted(entries):
        said = _refusal(entry, name, value, tmp_path, capsys)
        assert words in said, f"{entry} refuses {name}={value!r} in other words: {said!r}, not {words!r}"


def test_the_command_lines_refuse_a_bad_guarantee_by_its_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", str(tmp_path / "m"), str(tmp_path / "t.csv"), str(tmp_path / "o"), "--guarantee", "sure"])
    assert "--guarantee" in capsys.readouterr().err


def test_a_bad_fit_exit_heads_setting_is_a_fit_error():
    with pytest.raises(FitError, match="--lr must be a positive learning rate"):
        fit_exit_heads(None, [], lr=0.0)


def _defaults(function) -> dict:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _fields(settings) -> dict:
    return {field.name: field.default for field in dataclasses.fields(settings)}


def test_fit_model_defaults_are_fit_configs():
    """fit_model takes one FitConfig or its fields as keywords: its defaults are the object's, written once there."""
    parameters = inspect.signature(fit_model).parameters
    assert _defaults(fit_model) == {"config": None, "calibration": None, "unlabelled": None, "reference": None}
    assert parameters["fields"].kind is inspect.Parameter.VAR_KEYWORD
    with pytest.raises(TypeError, match="fit_model got unexpected keyword\\(s\\) max_drops: its config's fields are"):
        fit_model(None, None, None, None, max_drops=1.0)
    with pytest.raises(TypeError, match="fit_model takes its config once"):
        fit_model(None, None, None, None, FitConfig(), seed=1)


def test_fit_exit_heads_defaults_are_its_settings_objects():
    defaults = _defaults(fit_exit_heads)
    settings = HeadsFit()
    for name in _fields(Training):  # the training's: HeadsFit's default Training
        assert defaults[name] == getattr(settings.training, name), name
    for name in ("target_layers", "target", "min_saving", "confidence", "guarantee", "max_changed"):
        assert defaults[name] == getattr(settings.goal, name), name
    # max_drop None: 1.0 where target_layers is not given either, HeadsFit's goal
    assert defaults["max_drop"] is None and settings.goal.max_drop == 1.0
    for name in ("labels", "validation_fraction", "backend", "verbose"):
        assert defaults[name] == getattr(settings, name), name
    # where it differs from eek fit's, on purpose (docs/training.md's table, test_docs_fit_defaults)
    differ = {name for name, value in _fields(Training).items() if getattr(settings.training, name) != value}
    assert differ == {"pooling", "head", "progress"}
    assert settings.goal.confidence is None and FitConfig().confidence == 0.95  # uncertified, and certified


def test_calibrate_texts_default_goal_is_eek_calibrates():
    goal = inspect.signature(calibrate_texts).parameters["goal"].default
    assert goal is None  # DEFAULT_GOAL: 1 point at 0.95, eek calibrate's without a saved certificate
    from earlyexit_kernels.training.calibrate_texts import DEFAULT_GOAL

    assert (DEFAULT_GOAL.max_drop, DEFAULT_GOAL.confidence) == (1.0, FitConfig().confidence)


# ------------------------------------------------------------------------------ the audit's settings

# (AuditConfig's field, a bad value, eek serve's flags that give it: the budget in percentage points)
AUDIT_BAD = [
    ("fraction", 1.5, ["--audit-fraction", "1.5"]),
    ("fraction", float("nan"), ["--audit-fraction", "nan"]),
    ("budget", 1.5, ["--audit-fraction", "0.1", "--audit-budget", "150"]),
    ("confidence", 1.0, ["--audit-fraction", "0.1", "--audit-confidence", "1"]),
]


@pytest.mark.parametrize(("field", "value", "flags"), AUDIT_BAD, ids=[f"{f}={v}" for f, v, _ in AUDIT_BAD])
def test_a_bad_audit_setting_is_refused_in_the_audit_configs_words_everywhere(
    field, value, flags, saved_classifier, capsys
):
    pytest.importorskip("starlette", reason="the server needs the serve extra")
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings

    fields = {"fraction": 0.1, field: value}
    with pytest.raises(ValueError) as refused:
        AuditConfig(**fields)
    words = str(refused.value)
    assert f"the audit {field} must be" in words and f"got {value!r}" in words, words

    fraction = fields.pop("fraction")
    with pytest.raises(ValueError) as by_the_watch:
        AuditWatch(fraction, **fields)
    with pytest.raises(ValueError) as by_the_server:
        ServeSettings.from_options(audit_fraction=fraction, **{f"audit_{name}": v for name, v in fields.items()})
    by_the_command_line = _command(capsys, "serve", saved_classifier, *flags)
    assert str(by_the_watch.value) == words
    assert str(by_the_server.value) == words
    assert words in by_the_command_line and flags[-2] in by_the_command_line, by_the_command_line
