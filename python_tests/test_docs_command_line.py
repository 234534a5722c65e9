"""The command line docs/api.md describes is the parser's: every subcommand, every flag, the defaults it states.

Each subcommand has a section there, opened by its usage line (``python -m earlyexit_kernels
NAME ...``), whose table has one row per flag. A default written as a number or as one
backticked word is the parser's default; one written as prose ("the saved one") is not checked.
"""

import argparse
import re
from pathlib import Path

import pytest

from earlyexit_kernels.integrations.cli import build_parser

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SUBCOMMANDS: dict[str, argparse.ArgumentParser] = next(
    action.choices for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
)


def sections() -> dict[str, str]:
    """Subcommand -> the text of docs/api.md from its usage line to the next one (or the end of "Command line")."""
    text = API.read_text().split("\n## Command line\n")[1].split("\n## ")[0]
    parts = re.split(r"^python -m earlyexit_kernels (\w+) ", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def rows(section: str) -> list[tuple[list[str], str]]:
    """(the flags a row names, its default cell) of each row of a section's flag table."""
    found = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            found.append((re.findall(r"`(--[a-z][a-z-]*)", cells[0]), cells[1]))
    return found


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def test_every_subcommand_has_its_section():
    assert set(sections()) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_flag_has_its_row_and_every_row_is_a_flag(name):
    documented = {flag for row_flags, _ in rows(sections()[name]) for flag in row_flags}
    assert documented == set(flags(SUBCOMMANDS[name]))


def _stated_value(cell: str) -> str | None:
    """The value a default cell states (``64``, ``0.95``, `` `text` ``), or None for prose (or another flag's value)."""
    match = re.fullmatch(r"`([^`\s-][^`\s]*)`|(-?\d+(?:\.\d+)?)", cell)
    return None if match is None else match.group(1) or match.group(2)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_stated_default_is_the_parser_s(name):
    actions = flags(SUBCOMMANDS[name])
    wrong = []
    for row_flags, cell in rows(sections()[name]):
        stated = _stated_value(cell)
        default = actions[row_flags[0]].default
        if stated is None:
            continue
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            matches = float(stated) == float(default)
        else:
            matches = stated == default
        if not matches:
            wrong.append((row_flags[0], cell, default))
    assert not wrong, f"docs/api.md states defaults the parser does not have: {wrong}"


def _model_help(parser: argparse.ArgumentParser) -> str:
    return next(action.help for action in parser._actions if action.dest == "model")


@pytest.mark.parametrize(
    "name",
    ["classify", "serve", "evaluate"],
)
def test_the_model_help_of_a_command_that_takes_a_policy_says_a_plain_folder_needs_one(name):
    assert "--policy" in flags(SUBCOMMANDS[name])
    assert "plain" in _model_help(SUBCOMMANDS[name]) and "--policy" in _model_help(SUBCOMMANDS[name])


def test_the_commands_that_take_a_policy_are_those_checked_above():
    takes_a_policy = {name for name, parser in SUBCOMMANDS.items() if "--policy" in flags(parser)}
    assert takes_a_policy == {"classify", "serve", "evaluate"}
