"""``python -m earlyexit_kernels`` and the ``eek`` command: ``bench`` is :mod:`earlyexit_kernels.bench.commands`'s,
every other command :mod:`earlyexit_kernels.integrations.cli`'s (the benchmarks sit above the integrations, so
the command line that names both is here, above every layer)."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from earlyexit_kernels.bench.commands import main as bench
        from earlyexit_kernels.integrations.cli import program_name

        return bench(argv[1:], prog=f"{program_name()} bench")
    from earlyexit_kernels.bench.commands import HELP as BENCH_HELP
    from earlyexit_kernels.integrations.cli import main as integrations

    return integrations(argv, listed={"bench": BENCH_HELP})


if __name__ == "__main__":
    sys.exit(main())
