"""``eek bench sweep|stream|serve``: the benchmarks the package installs, each imported only when it runs."""

import subprocess
import sys

import pytest

from earlyexit_kernels.bench import commands

NO_TORCH = (
    "import sys; from earlyexit_kernels.__main__ import main\ntry:\n    main({argv})\nexcept SystemExit:\n    pass\n"
)


def _imports_torch(argv: list[str]) -> tuple[bool, str]:
    code = NO_TORCH.format(argv=argv) + "print('torch' in sys.modules, file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stderr.strip().splitlines()[-1] == "True", done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench"]])
def test_the_help_of_eek_and_of_eek_bench_imports_no_torch(argv):
    imported, shown = _imports_torch(argv)
    assert not imported
    if argv[0] == "--help":
        assert "bench" in shown and "eek bench sweep|stream|serve" in shown.replace("\n", " ").replace("  ", " ")
    else:
        assert all(name in shown for name in commands.SUBCOMMANDS)


def test_each_subcommand_is_its_module_s_command_line(capsys):
    for name in ("sweep", "stream", "serve"):
        with pytest.raises(SystemExit) as done:
            commands.main([name, "--help"])
        assert done.value.code == 0
        assert f"usage: eek bench {name}" in capsys.readouterr().out


def test_an_unknown_subcommand_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as done:
        commands.main(["sweeep"])
    assert done.value.code == 2
    assert "invalid choice: 'sweeep'" in capsys.readouterr().err


def test_the_sweep_s_flags_without_a_subcommand_still_run_the_sweep(capsys, monkeypatch):
    """``eek bench sweep --smoke ...`` as before the subcommands, with a note; kept one release."""
    ran = []
    monkeypatch.setitem(commands.SUBCOMMANDS, "sweep", (None, ""))
    monkeypatch.setattr(commands, "_sweep", lambda argv: ran.append(argv) or 0)
    assert commands.main(["--smoke", "--no-progress"]) == 0
    assert commands.main([], bare_runs_the_sweep=True) == 0
    assert ran == [["--smoke", "--no-progress"], []]
    assert "runs the sweep; say eek bench sweep" in capsys.readouterr().err
    assert commands.main([]) == 2  # eek bench alone: the help


def test_the_real_model_beside_infinity_says_where_it_moved(capsys):
    from earlyexit_kernels.bench import serve_load

    with pytest.raises(SystemExit) as done:
        serve_load.main(["--rotten-tomatoes", "--backbone", "all"])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert "python -m benchmarks.suite.serve_peers_cli --rotten-tomatoes --backbone all" in error


def test_a_recorded_command_renders_as_the_command_that_runs_it_today():
    """A committed result keeps the command that made it; the sections written from it name today's."""
    from benchmarks.suite.command_names import current_command

    assert (
        current_command("python -m earlyexit_kernels.bench --spot-models albert --output-dir benchmarks/results/cpu")
        == "eek bench sweep --spot-models albert --output-dir benchmarks/results/amd_epyc/cpu"
    )
    assert current_command("python -m earlyexit_kernels.bench --stack --stack-texts 600").startswith(
        "python -m benchmarks.suite.stack --stack-texts 600"
    )
    assert current_command("python -m earlyexit_kernels.bench.serve_load --rotten-tomatoes").startswith(
        "python -m benchmarks.suite.serve_peers_cli --rotten-tomatoes"
    )
    assert current_command("eek fit model train.csv out") == "eek fit model train.csv out"  # never moved
    assert current_command("x --output benchmarks/results/nowhere.json") == "x --output benchmarks/results/nowhere.json"
