"""docs/training.md's table of the defaults where ``fit_exit_heads`` and ``eek fit`` differ states both sides' defaults.

``fit_exit_heads``'s column writes ``name=value`` (its signature's default); ``eek fit``'s
writes ``--flag value`` (the parser's default, or the one its help states when the parser's is
None because the command decides it).
"""

import argparse
import inspect
import re
from pathlib import Path

from earlyexit_kernels.integrations.cli import build_parser
from earlyexit_kernels.training import fit_exit_heads

TRAINING = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def table() -> list[tuple[str, str]]:
    """(the fit_exit_heads cell, the eek fit cell) of each row of the table under "Fit in one call"."""
    lines = TRAINING.read_text().split("## Fit in one call")[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| | `fit_exit_heads` | `eek fit` |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        _, library, command = (cell.strip() for cell in line.strip("|").split(" | "))
        rows.append((library, command))
    return rows


def _value(text: str):
    return None if text == "None" else text if not re.fullmatch(r"-?\d+(\.\d+)?", text) else float(text)


def _fit_defaults() -> dict[str, object]:
    fit = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    defaults = {}
    for action in fit._actions:
        for option in action.option_strings:
            stated = re.search(r"\(default: ([^\s),;]+)", action.help or "")
            default = action.default if action.default is not None or stated is None else stated.group(1)
            defaults[option] = _value(str(default))
    return defaults


def test_the_table_has_its_rows():
    assert len(table()) == 3


def test_the_library_column_states_fit_exit_heads_defaults():
    parameters = inspect.signature(fit_exit_heads).parameters
    stated = [pair for library, _ in table() for pair in re.findall(r"`(\w+)=([^`]+)`", library)]
    assert len(stated) == 4
    for name, value in stated:
        assert _value(value) == _value(str(parameters[name].default)), name


def test_the_command_column_states_eek_fit_defaults():
    defaults = _fit_defaults()
    stated = [pair for _, command in table() for pair in re.findall(r"`(--[a-z-]+) ([^`]+)`", command)]
    assert len(stated) == 5
    for flag, value in stated:
        assert _value(value) == defaults[flag], flag
