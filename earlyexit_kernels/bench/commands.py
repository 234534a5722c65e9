"""``eek bench sweep|stream|serve`` (also ``python -m earlyexit_kernels.bench``): each subcommand's module is imported
only when it runs, so ``eek bench --help`` imports no torch. Without a subcommand,
``python -m earlyexit_kernels.bench [flags]`` runs the sweep, as before the subcommands (kept for one release).
"""

from __future__ import annotations

import argparse
import sys


def _sweep(argv: list[str]) -> int:
    from earlyexit_kernels.bench.sweep import main

    return main(argv)


def _stream(argv: list[str]) -> int:
    from earlyexit_kernels.bench.stream import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from earlyexit_kernels.bench.serve_load import main

    return main(argv)


#: subcommand -> (what runs it, the line ``eek bench --help`` shows)
SUBCOMMANDS = {
    "sweep": (
        _sweep,
        "the patched model against the plain one (eager; CUDA graphs on a GPU) and the naive ports, over batch "
        "sizes, lengths and exit patterns, with the layer and shape-aware ideals",
    ),
    "stream": (
        _stream,
        "one corpus of sentence lengths classified five ways (pipeline, plain, per-batch exit, eek.classify, "
        "compiled), against the token-layer ideal",
    ),
    "serve": (_serve, "two eek serve processes on 127.0.0.1, early exit and none, at concurrency 1-128"),
}
#: what ``eek --help`` says of ``bench``
HELP = "benchmarks on this machine: eek bench sweep|stream|serve (eek bench --help)"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmarks on this machine, each against what you would run instead. "
        "Each subcommand's --help says what it measures and takes.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_line) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv=None, prog: str = "eek bench", bare_runs_the_sweep: bool = False) -> int:
    """``bare_runs_the_sweep``: no arguments at all run the sweep (``python -m earlyexit_kernels.bench``'s
    meaning before the subcommands) instead of printing the help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]][0](argv[1:])
    if (argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help")) or (not argv and bare_runs_the_sweep):
        # the sweep's flags without a subcommand: the command line before the subcommands, kept for one release
        print(f"note: {prog} without a subcommand runs the sweep; say {prog} sweep", file=sys.stderr)
        return _sweep(argv)
    parser = _parser(prog)
    if not argv:
        parser.print_help()
        return 2
    parser.parse_args(argv)  # --help, or an unknown subcommand: argparse says so and exits
    return 2
