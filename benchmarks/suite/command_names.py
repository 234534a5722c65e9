"""The commands committed results recorded, in the names that run them today.

A result keeps the command that made it, as it ran; the sections written from it show the command
that makes it now, so a reader can run what the page says. One entry per move, newest last.
"""

from __future__ import annotations

#: (recorded prefix, today's) for each benchmark that moved or was renamed (issue 75)
RENAMED = (
    ("python -m earlyexit_kernels.bench --stack ", "python -m benchmarks.suite.stack "),
    ("python -m earlyexit_kernels.bench.serve_load ", "python -m benchmarks.suite.serve_peers_cli "),
    ("python -m earlyexit_kernels.bench.real_task_quality", "python -m benchmarks.suite.real_task_quality"),
    ("python -m earlyexit_kernels.bench.cut_model_peer", "python -m benchmarks.suite.cut_model_peer"),
    ("python -m earlyexit_kernels.bench.ray_throughput", "python -m benchmarks.suite.ray_throughput"),
    ("python -m earlyexit_kernels.bench.exit_quality", "python -m benchmarks.suite.exit_quality"),
    ("python -m earlyexit_kernels.bench.report", "python -m benchmarks.suite.report"),
    ("python -m earlyexit_kernels.bench.stream", "eek bench stream"),
    ("python -m earlyexit_kernels.bench ", "eek bench sweep "),
)


def current_command(recorded: str) -> str:
    """``recorded`` with the benchmark's name of today; a command that never moved comes back as it is."""
    for old, new in RENAMED:
        if recorded.startswith(old):
            return new + recorded[len(old) :]
    return recorded
