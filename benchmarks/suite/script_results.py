"""What the JSON result of a script under ``benchmarks/`` opens with, and where it is written:
``--output`` (the JSON, under ``benchmarks/results/``) and ``--readme`` (its generated Markdown section).

A script sits in the folder of its kind (``benchmarks/statistics/``, ``profiles/``, ``simulations/``,
``micro/``, ``quality/``: ``benchmarks/README.md``) and passes :func:`run_conditions` its path from the
repository root, which the result's ``command`` records."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.suite.markdown_sections import replace_section
from earlyexit_kernels.bench.results import cpu_name

__all__ = ["run_conditions", "write_json", "write_section"]


def run_conditions(script: str, argv: list[str] | None, started: float) -> dict:
    """When, on which CPU, with which threads and versions, by which command (``script`` and
    ``argv``, default the process's arguments) and in how many seconds since ``started``
    (``time.perf_counter()``) the result was measured."""
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": f"{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": time.perf_counter() - started,
    }


def write_json(path: Path, results: dict) -> None:
    """``results`` as indented JSON at ``path`` (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_section(path: Path, start: str, end: str, section: str, heading: str) -> None:
    """``section`` (markers included) in place of the one between ``start`` and ``end`` in the
    Markdown file ``path``, or appended under ``## heading`` (:func:`replace_section`)."""
    path.write_text(replace_section(path.read_text(), start, end, section, heading=heading))
