"""The commands committed results recorded, in the names that run them today.

A result keeps the command that made it, as it ran; the sections written from it show the command
that makes it now, so a reader can run what the page says. One entry per move, newest last.
"""

from __future__ import annotations

import re
from pathlib import Path

#: the folder of the committed results: one folder per device, the results inside (issue 75)
RESULTS = Path(__file__).resolve().parents[1] / "results"

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
    """``recorded`` with the benchmark's name of today and the results it names where they are filed today
    (``benchmarks/results/x_cpu.json`` -> ``benchmarks/results/amd_epyc/x_cpu.json``); a command that never moved
    comes back as it is."""
    for old, new in RENAMED:
        if recorded.startswith(old):
            recorded = new + recorded[len(old) :]
            break
    return re.sub(r"benchmarks/results/([^/\s`,]+)", lambda m: "benchmarks/results/" + _filed(m.group(1)), recorded)


def _filed(name: str) -> str:
    """``name`` (a result, or a folder of results, once directly under ``benchmarks/results/``) with the folder of
    the device it is filed under today, where one holds it; else as it is."""
    if (RESULTS / name).exists():
        return name
    homes = (
        [folder.name for folder in sorted(RESULTS.iterdir()) if (folder / name).exists()] if RESULTS.is_dir() else []
    )
    return f"{homes[0]}/{name}" if len(homes) == 1 else name
