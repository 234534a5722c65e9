"""``python -m earlyexit_kernels.bench sweep|stream|serve``: ``eek bench`` (:mod:`earlyexit_kernels.bench.commands`)."""

from earlyexit_kernels.bench.commands import main

raise SystemExit(main(prog="python -m earlyexit_kernels.bench", bare_runs_the_sweep=True))
