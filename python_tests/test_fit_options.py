"""``eek fit``'s and ``eek calibrate``'s options are made from the fit settings' fields (issue 97 item 3,
integrations/cli_options.py): one help line per setting (the field's metadata, ``_fit_fields.FIT_FIELDS``, shared by
every command that takes it), one bound (the settings object's check, its words with the flag named) and one
default (the object's; where a command's differs, the table below says why)."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from earlyexit_kernels._fit_fields import FIT_FIELDS, HEAD_CHOICES, POOLING_CHOICES, RISK_CHOICES
from earlyexit_kernels.calibration.certificate import GUARANTEES
from earlyexit_kernels.calibration.select import Goal
from earlyexit_kernels.engine.step.heads import HEAD_FORMS, HEAD_POOLINGS
from earlyexit_kernels.integrations import fit_cli
from earlyexit_kernels.integrations.cli import build_parser, main
from earlyexit_kernels.integrations.cli_options import FIT_DEFAULTS, checked
from earlyexit_kernels.integrations.recertify_folder import Recalibration
from earlyexit_kernels.patching.fit_record import SAVED
from earlyexit_kernels.training.calibrate_texts import BASE_RISKS, DEFAULT_GOAL
from earlyexit_kernels.training.fit_config import FitConfig, FitError, Training

COMMANDS = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
#: the options each command makes from the fields (eek calibrate's and eek evaluate's --batch-size are another
#: setting, rows per inference batch: Recalibration's, in the table below, and eek evaluate's own)
MADE = {
    "fit": fit_cli.FIT_FLAGS,
    "calibrate": ("max_length", "progress", *fit_cli.CALIBRATE_DEFAULTS),
    "evaluate": ("max_length", "progress"),
}

# (command, setting, its settings object, why the command's default differs from the object's; None: it does not)
DEFAULTS = [
    ("fit", "method", FitConfig, None),
    ("fit", "pooling", FitConfig, None),
    ("fit", "head", FitConfig, None),
    ("fit", "max_drop", FitConfig, None),
    ("fit", "confidence", FitConfig, None),
    ("fit", "guarantee", FitConfig, None),
    ("fit", "max_changed", FitConfig, None),
    ("fit", "calibration_fraction", FitConfig, None),
    ("fit", "tries", FitConfig, None),
    ("fit", "epochs", FitConfig, None),
    ("fit", "lr", FitConfig, None),
    ("fit", "batch_size", FitConfig, None),
    ("fit", "max_length", FitConfig, None),
    ("fit", "seed", FitConfig, None),
    ("fit", "progress", FitConfig, "None: on where stderr is a terminal; the command gives FitConfig the answer"),
    ("fit", "validation_split", FitConfig, "None: 0.1 without --validation; FitConfig's None: rows from elsewhere"),
    ("calibrate", "max_drop", Recalibration, None),  # None: the folder's
    ("calibrate", "confidence", Recalibration, None),  # SAVED: the folder's
    ("calibrate", "guarantee", Recalibration, None),
    ("calibrate", "max_changed", Recalibration, None),
    ("calibrate", "max_length", Recalibration, None),
    ("calibrate", "risk", Recalibration, None),
    ("calibrate", "batch_size", Recalibration, None),  # its own option: rows per batch
]


def _option(command: str, name: str) -> argparse.Action:
    return next(a for a in COMMANDS[command]._actions if a.dest == name)


def _default(settings: type, name: str):
    return next(f.default for f in dataclasses.fields(settings) if f.name == name)


@pytest.mark.parametrize(("command", "name", "settings", "why"), DEFAULTS, ids=[f"{c} {n}" for c, n, *_ in DEFAULTS])
def test_each_command_s_default_is_its_settings_objects(command, name, settings, why):
    default = _option(command, name).default
    if why is None:
        assert default == _default(settings, name), f"eek {command} --{name}: {default!r}"
    else:  # the command decides, from what it is given
        assert default is None, why


def test_the_table_covers_every_setting_option_of_eek_fit_and_eek_calibrate():
    listed = {(command, name) for command, name, *_ in DEFAULTS}
    assert {name for c, name in listed if c == "fit"} == set(MADE["fit"])
    assert {name for c, name in listed if c == "calibrate"} == set(MADE["calibrate"]) - {"progress"} | {"batch_size"}
    assert FIT_DEFAULTS == {name: _option("fit", name).default for name in fit_cli.FIT_FLAGS}


@pytest.mark.parametrize("command", ["fit", "calibrate", "evaluate"])
def test_each_option_s_help_metavar_and_choices_are_its_fields(command):
    for name in MADE[command]:
        action, meta = _option(command, name), FIT_FIELDS[name]
        assert action.help.startswith(meta["help"] + " (default: "), (command, action.dest)
        if meta["choices"]:
            assert tuple(action.choices) == meta["choices"], action.dest
        elif name != "progress":
            assert action.metavar == meta["metavar"], action.dest


def test_one_help_line_per_setting_across_the_commands():
    lines = {}
    for command, names in MADE.items():
        for name in names:
            lines.setdefault(name, set()).add(_option(command, name).help.split(" (default: ")[0])
    assert all(len(said) == 1 for said in lines.values()), lines


def test_the_fields_carry_the_metadata_the_options_are_made_from():
    """Each field of a fit setting (FitConfig's, Training's, the Goal's, Recalibration's) carries its FIT_FIELDS
    entry, but Recalibration's batch_size (rows per batch, another setting than FitConfig's); each entry is a field
    of FitConfig, the object eek fit builds, or of Recalibration, eek calibrate's."""
    for settings in (FitConfig, Training, Goal, Recalibration):
        for field in dataclasses.fields(settings):
            if field.name in FIT_FIELDS and (settings, field.name) != (Recalibration, "batch_size"):
                assert dict(field.metadata) == FIT_FIELDS[field.name], (settings.__name__, field.name)
    assert set(FIT_FIELDS) <= {field.name for kind in (FitConfig, Recalibration) for field in dataclasses.fields(kind)}


def test_the_choices_are_the_objects():
    from earlyexit_kernels._method_names import METHODS

    assert FIT_FIELDS["method"]["choices"] == METHODS
    assert POOLING_CHOICES == ("auto", *HEAD_POOLINGS) and HEAD_CHOICES == ("auto", *HEAD_FORMS)
    assert FIT_FIELDS["guarantee"]["choices"] == tuple(GUARANTEES)
    assert RISK_CHOICES == ("auto", *BASE_RISKS) == FIT_FIELDS["risk"]["choices"]


def test_eek_calibrate_says_a_folder_without_a_certificate_gets_the_library_s_goal():
    for name, said in fit_cli.CALIBRATE_SHOWN.items():
        value = getattr(DEFAULT_GOAL, name)
        shown = FIT_FIELDS[name]["none"] if value is None else value if isinstance(value, str) else f"{value:g}"
        assert said == f"FOLDER's certificate's, else {shown}", name
    assert fit_cli.CALIBRATE_DEFAULTS == {name: _default(Recalibration, name) for name in fit_cli.CALIBRATE_DEFAULTS}
    assert _default(Recalibration, "confidence") == SAVED


def _words(settings, **fields) -> str:
    with pytest.raises(ValueError) as refused:
        settings(**fields)
    return str(refused.value)


# (command, flag, value, the words: the object's, with the flag named where they name the field only)
REFUSED = [
    ("fit", "--max-drop", "-1", "--max-drop: " + _words(Goal, max_drop=-1.0)),
    ("calibrate", "--max-drop", "-1", "--max-drop: " + _words(Goal, max_drop=-1.0)),
    ("fit", "--confidence", "1.5", "--confidence: " + _words(Goal, max_drop=1.0, confidence=1.5)),
    ("calibrate", "--confidence", "0", "--confidence: " + _words(Goal, max_drop=1.0, confidence=0.0)),
    ("fit", "--max-changed", "100", "--max-changed: " + _words(FitConfig, max_changed=100.0)),
    ("calibrate", "--max-changed", "-1", "--max-changed: " + _words(FitConfig, max_changed=-1.0)),
    ("fit", "--lr", "0", _words(FitConfig, lr=0.0)),
    ("fit", "--epochs", "0", _words(FitConfig, epochs=0)),
    ("fit", "--batch-size", "0", _words(FitConfig, batch_size=0)),
    ("calibrate", "--batch-size", "0", _words(Recalibration, batch_size=0)),
    ("calibrate", "--max-length", "0", _words(Recalibration, max_length=0)),
    ("fit", "--calibration-fraction", "1", _words(FitConfig, calibration_fraction=1.0)),
    ("fit", "--validation-split", "1.5", _words(FitConfig, validation_split=1.5)),
]


@pytest.mark.parametrize(("command", "flag", "value", "words"), REFUSED, ids=[" ".join(r[:3]) for r in REFUSED])
def test_a_bad_value_is_the_objects_words_with_the_flag_named(command, flag, value, words, tmp_path, capsys):
    """Refused before a file is read or a model loaded (none of these paths exists)."""
    paths = ["model", "train.csv", "out"] if command == "fit" else ["folder", "rows.csv"]
    assert main([command, *(str(tmp_path / path) for path in paths), flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"error: {words}"
    assert words.startswith(flag)


def test_checked_names_the_flag_of_a_field_s_refusal():
    assert checked(Goal, {"max_drop": 2.0}).max_drop == 2.0
    with pytest.raises(FitError, match=r"^--max-drop: max_drop must be >= 0 accuracy points"):
        checked(Goal, {"max_drop": -1.0})
    with pytest.raises(FitError, match=r"^--lr must be a positive learning rate"):  # the object names it
        checked(FitConfig, {"lr": 0.0})


def test_the_options_are_made_without_torch():
    code = (
        "import sys; from earlyexit_kernels.integrations.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
