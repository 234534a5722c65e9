"""The engine's command-line options are made from EngineConfig's fields (integrations/cli_options.py):
eek classify and eek serve show one help line per setting, take their defaults from their own settings
objects, and refuse a bad value in EngineConfig's words with the flag named."""

import argparse
import dataclasses
import inspect

import pytest

from earlyexit_kernels.engine.entry.classify import classify
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.integrations import cli, serve_cli
from earlyexit_kernels.integrations.cli import build_parser, main
from earlyexit_kernels.integrations.cli_options import checked_engine, engine_keywords


def _subcommand(name: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions
    return next(a.choices for a in actions if isinstance(a, argparse._SubParsersAction))[name]


def _options(parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def test_eek_classify_and_eek_serve_show_the_fields_help_line_once():
    classify_options, serve_options = _options(_subcommand("classify")), _options(_subcommand("serve"))
    for name in cli.CLASSIFY_ENGINE_FLAGS:
        field = next(f for f in dataclasses.fields(EngineConfig) if f.name == name)
        assert classify_options[name].help.startswith(field.metadata["help"])
        assert serve_options[name].help.split(" (default")[0] == classify_options[name].help.split(" (default")[0]


def test_the_defaults_are_the_entry_points_own_settings():
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings

    served = ServeSettings().engine
    serve_defaults = engine_keywords(
        argparse.Namespace(**serve_cli.SERVE_ENGINE_DEFAULTS), serve_cli.SERVE_ENGINE_FLAGS
    )
    assert serve_defaults == {name: getattr(served, name) for name in serve_cli.SERVE_ENGINE_FLAGS}
    signature = inspect.signature(classify).parameters
    assert cli.CLASSIFY_ENGINE_DEFAULTS == {name: signature[name].default for name in cli.CLASSIFY_ENGINE_FLAGS}
    parsed = _subcommand("serve").parse_args(["m"])
    assert {name: getattr(parsed, name) for name in serve_cli.SERVE_ENGINE_FLAGS} == serve_cli.SERVE_ENGINE_DEFAULTS


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-batch-size", "0", "--max-batch-size: max_batch_size must be an integer >= 1 or None, got 0"),
        ("--max-tokens", "0", "--max-tokens: max_tokens must be an integer >= 1 or None, got 0"),
        ("--max-length", "-2", "--max-length: max_length must be an integer >= 1 or None, got -2"),
    ],
)
def test_a_bad_value_gets_the_settings_objects_words_from_both_commands(flag, value, words, capsys, tmp_path):
    with pytest.raises(ValueError) as from_library:
        EngineConfig(**{flag[2:].replace("-", "_"): int(value)})
    assert words.endswith(str(from_library.value))
    for argv in (["classify", "m", str(tmp_path / "i.csv"), str(tmp_path / "o.csv")], ["serve", str(tmp_path)]):
        assert main([*argv, flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"error: {words}"


def test_checked_engine_names_the_flag_of_a_bad_value():
    assert checked_engine({"max_batch_size": 8}, admission="fifo").max_batch_size == 8
    with pytest.raises(Exception, match="^--call-cost: call_cost must be a number >= 0"):
        checked_engine({"call_cost": -1.0})


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max-queue", "0"], "--max-queue: max_queue must be an integer >= 1, got 0"),
        (["--max-client-batch-size", "0"], "--max-client-batch-size: max_client_batch_size must be an integer >= 1"),
        (["--max-body-bytes", "0"], "--max-body-bytes: max_body_bytes must be an integer >= 1 (bytes), got 0"),
    ],
)
def test_eek_serve_s_request_limits_are_http_limits_fields_and_refused_in_its_words(flags, words, capsys):
    """--max-queue, --max-client-batch-size and --max-body-bytes: the help line HttpLimits' field carries, its
    default, and its refusal with the flag named, before any model is read (the model here does not exist)."""
    pytest.importorskip("starlette", reason="the server needs the serve extra")
    from earlyexit_kernels.integrations.server.serve_settings import HttpLimits

    serve = _options(_subcommand("serve"))
    for field in dataclasses.fields(HttpLimits):
        if field.metadata:
            assert serve[field.name].help.startswith(field.metadata["help"])
            assert serve[field.name].default == field.default
    assert main(["serve", "/nonexistent/model", *flags]) == 2
    assert f"error: {words}" in capsys.readouterr().err
