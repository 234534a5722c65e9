"""The suite's long-format CSV: one row per (what was timed, configuration).

``kind`` is ``e2e`` (a whole forward), ``exit_step`` or ``compact`` (microbenchmarks).
Times are seconds per forward (per call for the micro rows), p20/p50/p80 over the
repetitions. For ``e2e`` rows:

- what ran: ``method`` (``full``: the unpatched model, eager; ``peer``: the unpatched model
  captured or compiled; ``eek``; ``naive``; ``bs1``) and ``backend``; ``policy``, the exit
  policy's code (``Scheduled`` for the pattern replayed, ``Entropy(0.3)`` for the Entropy
  variant of :mod:`.threshold_pattern`; empty for the unpatched rows); ``step``, the per-layer
  step an ``eek`` row ran, resolved (``exact`` or ``graphed``, never ``auto``; ``graphed-lag<N>``
  where ``--graphed-lags`` set a lag other than the device's, ``graphed-prologue`` with
  ``--graphed-prologue``; empty for the others); ``peer``, which unpatched model a ``full`` or ``peer`` row is: ``eager``,
  ``cuda-graphs`` (its forward captured in one CUDA graph on fixed inputs, with the mask as given),
  ``cuda-graphs-fast-attn`` (the same without a mask where nothing is padded, SDPA held to its fast
  kernels: :mod:`.peers`) or ``compile-reduce-overhead`` (``torch.compile(model, mode="reduce-overhead")``),
  empty for the others;
- ``speedup_vs_full`` = p50 of ``full`` (the eager unpatched model) / p50 of the row (``bs1``:
  over the same B sequences); ``strongest_peer``, the fastest unpatched model of the
  configuration (by p50, among ``eager`` and the peers that ran and agreed with it), and
  ``speedup_vs_peer`` = its p50 / p50 of the row;
- ``ideal_layers``, ``ideal_shape`` and ``ratio_ideal_*`` = speed-up / ideal (see :mod:`.ideal`);
- ``host_syncs``: read-backs to the host in one forward (the engine's ``out.host_syncs``,
  the baselines counted the same way; blank for ``full``, whose syncs inside Hugging Face
  are not counted), ``syncs_per_layer`` = ``host_syncs / L``;
- ``nonlayer_p50_s``: p50 of the same call with every encoder layer an identity;
  ``nonlayer_overhead`` = (its excess over the full model's) / the full model's p50 time;
- ``peak_mem_bytes``: see :func:`.timing.peak_memory`; ``peak_mem_vs_full`` its ratio to
  the full model's;
- ``check``: ``ok`` when the row's exit layers equal the pattern and its logits match the
  naive baseline's (without the baselines, the first ``eek`` row's; and, at f = 0, the full
  model's; a peer's: the full model's), else what differed; ``skipped: <why>`` for a row that
  was not measured (a peer without CUDA, an Entropy variant the heads cannot reproduce), whose
  times are empty;
- ``graph_*`` (``step=graphed`` rows): the steps captured in CUDA graphs, the graph replays and
  the steps run uncaptured over the row's warm-up and timed calls, ``first_capture_s`` (the
  first capture's seconds, its warm-up run included) and ``graph_fallback``, why steps ran
  uncaptured (empty when none did). A graphed row on the GPU with ``graph_eager`` > 0 timed
  the uncaptured step, not the graphed one.

:func:`read_csv` reads files written before a column was added: a missing column reads as ``""``.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
from pathlib import Path

import torch

from earlyexit_kernels.engine.layers.int8_isa import cpu_flags

__all__ = ["COLUMNS", "environment", "write_csv", "append_csv", "read_csv"]

COLUMNS = [
    "kind",
    "method",
    "backend",
    "policy",
    "step",
    "peer",
    "model",
    "config",
    "dtype",
    "attn",
    "B",
    "S",
    "L",
    "f",
    "f_actual",
    "pattern",
    "t_p20_s",
    "t_p50_s",
    "t_p80_s",
    "repeats",
    "speedup_vs_full",
    "speedup_vs_peer",
    "strongest_peer",
    "ideal_layers",
    "ideal_shape",
    "ratio_ideal_layers",
    "ratio_ideal_shape",
    "host_syncs",
    "syncs_per_layer",
    "nonlayer_p50_s",
    "nonlayer_overhead",
    "peak_mem_bytes",
    "peak_mem_vs_full",
    "check",
    "graph_captures",
    "graph_replays",
    "graph_eager",
    "first_capture_s",
    "graph_fallback",
    "device",
    "device_name",
    "threads",
    "load_1m",
    "torch",
    "triton",
    "transformers",
    "earlyexit_kernels",
    "timestamp",
]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: a CPU's model name -> its results folder; a name none of these start with gets its own words, snake-cased
_CPU_FOLDERS = (("AMD EPYC", "amd_epyc"), ("Intel(R) Xeon(R)", "intel_xeon"))


def device_folder(device: str | torch.device = "cpu", name: str | None = None) -> str:
    """The folder of a device's results under ``benchmarks/results/``, one per machine kind, as Liger-Kernel files
    them: ``amd_epyc``, ``intel_xeon``, ``nvidia_h100_80gb_hbm3`` (the GPU's name). ``name``: the device's name
    (default this machine's CPU, or the CUDA device's)."""
    device = torch.device(device)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    for prefix, folder in _CPU_FOLDERS:
        if name.startswith(prefix):
            return folder
    words = re.findall(r"[a-z0-9]+", name.lower().replace("(r)", "").replace("(tm)", ""))
    return "_".join(words) or "unknown_cpu"


#: the x86 instruction sets the int8 and float32 kernels' speed depends on, by their /proc/cpuinfo flags
INSTRUCTION_SETS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX": ("amx_int8",),
}


def instruction_sets(flags: str | None = None) -> list[str]:
    """Which of :data:`INSTRUCTION_SETS` this CPU has (its ``/proc/cpuinfo`` flags; ``flags`` to read others').

    Empty where /proc/cpuinfo has no flags line (another OS, another architecture)."""
    present = cpu_flags() if flags is None else set(flags.split())
    return [name for name, names in INSTRUCTION_SETS.items() if present.intersection(names)]


def environment(device: torch.device) -> dict:
    """The columns that describe where and with what the suite ran."""
    import transformers

    from earlyexit_kernels._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores)"
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "load_1m": f"{os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "earlyexit_kernels": __version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})


def _header(path: Path) -> list[str] | None:
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def append_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` added at the end of ``path``, with the header first where the file is new or empty.

    A file written with other columns (an older version of the suite) is rewritten first with
    today's, its rows kept (a column it lacks left empty), so that every line has one layout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or path.stat().st_size == 0
    if not fresh and _header(path) != COLUMNS:
        write_csv(path, read_csv(path))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if fresh:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        f.flush()


def read_csv(path: Path) -> list[dict]:
    """The rows of ``path``, each with every column of :data:`COLUMNS` (``""`` where the file has none)."""
    with Path(path).open(newline="") as f:
        return [{**dict.fromkeys(COLUMNS, ""), **row} for row in csv.DictReader(f)]
