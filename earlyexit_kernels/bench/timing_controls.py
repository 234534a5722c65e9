"""Timing controls for the GPU runs: a pinned host thread, one torch thread, no collections, the GPU's clocks.

The eager model on an H100 is host-bound and its time moved between runs: its p50 for BERT-base
bf16 at B = 64, S = 128 ran from 4.3 to 9.9 ms over the rows of the sessions' CSVs
(benchmarks/results/nvidia_h100_80gb_hbm3/), torch on 16 threads. What a run can hold still from inside its
process, each a context that puts things back as they were, also on an exception:

- :func:`pinned`: the calling thread (Python's main thread, which launches every kernel) and the
  threads it starts afterwards on one CPU (``os.sched_setaffinity``); by default the lowest CPU
  the process may use other than CPU 0 (which takes most interrupts) where there is another.
  Threads started before (CUDA's own, torch's pools) keep theirs;
- :func:`host_threads`: ``torch.set_num_threads(n)``;
- :func:`gc_paused`: a collection first, then Python's garbage collector off (``gc.disable``),
  turned on again after where it was on;
- :func:`gpu_state`: ``nvidia-smi``'s SM and memory clocks, its active clock-event (throttle)
  reasons decoded, temperature and power draw, per GPU; where ``nvidia-smi`` is missing or
  fails, a dict that says so instead (never an error).

:func:`timing_controls` takes the first two for a whole run and reads :func:`gpu_state` before
and after it; what it did goes to the run's ``meta.json`` (``eek bench sweep --timing-controls``,
on by default on CUDA). The sweep pauses the collector per configuration (``gc_paused``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import torch

__all__ = ["gc_paused", "gpu_state", "host_threads", "pinned", "timing_controls"]

#: what ``nvidia-smi --query-gpu`` is asked for, by its field names
GPU_FIELDS = ("index", "name", "clocks.sm", "clocks.max.sm", "clocks.mem", "REASONS", "temperature.gpu", "power.draw")
#: the active clock-event reasons' field: its name since driver 535, then the older one
_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
#: NVML's clock-event reason bits (nvmlClocksEventReason*)
_REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
#: where nvidia-smi sits when it is not on PATH (a container's driver mount, the usual install)
_NVIDIA_SMI_PLACES = ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Inside: no garbage collection (one runs first); the collector is on again after where it was."""
    was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _default_core(allowed: set[int]) -> int:
    others = sorted(allowed - {0})
    return others[0] if others else min(allowed)


@contextlib.contextmanager
def pinned(core: int | None = None) -> Iterator[dict]:
    """Inside: the calling thread on one CPU (``core``, default: see the module). Yields what was done
    (``pinned_core``, ``affinity_before``), or why nothing was (``pinned``: the reason)."""
    if not hasattr(os, "sched_setaffinity"):
        yield {"pinned": "not pinned: os.sched_setaffinity is not available on this system"}
        return
    before = os.sched_getaffinity(0)
    chosen = _default_core(before) if core is None else core
    try:
        os.sched_setaffinity(0, {chosen})
    except OSError as err:
        yield {"pinned": f"not pinned to CPU {chosen}: {err}", "affinity_before": sorted(before)}
        return
    try:
        yield {"pinned_core": chosen, "affinity_before": sorted(before)}
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def host_threads(n: int) -> Iterator[int]:
    """Inside: torch on ``n`` threads; yields the count before, put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _nvidia_smi(which: Callable[[str], str | None]) -> str | None:
    found = which("nvidia-smi")
    if found:
        return found
    return next((p for p in _NVIDIA_SMI_PLACES if os.access(p, os.X_OK)), None)


def _reasons(value: str) -> list[str] | str:
    """``0x0000000000000004`` -> ``["sw_power_cap"]``; what is not a number is kept as it is."""
    try:
        bits = int(value, 16)
    except ValueError:
        return value
    names = [name for bit, name in _REASON_BITS.items() if bits & bit]
    unknown = bits & ~sum(_REASON_BITS)
    return names + ([f"0x{unknown:x}"] if unknown else [])


def gpu_state(run: Callable = subprocess.run, which: Callable[[str], str | None] = shutil.which) -> dict:
    """``{"gpus": [{field: value, ...}, ...]}`` from ``nvidia-smi --query-gpu``, or ``{"nvidia_smi": why not}``.

    ``run``/``which``: ``subprocess.run`` and ``shutil.which`` (tests replace them)."""
    tool = _nvidia_smi(which)
    if tool is None:
        return {"nvidia_smi": "missing: nvidia-smi is not on PATH (nor in /usr/local/nvidia/bin, /usr/bin)"}
    last = ""
    for reason_field in _REASON_FIELDS:
        fields = [reason_field if f == "REASONS" else f for f in GPU_FIELDS]
        command = [tool, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
        try:
            done = run(command, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            return {"nvidia_smi": f"failed: {type(err).__name__}: {err}"}
        if done.returncode == 0:
            gpus = []
            for line in done.stdout.strip().splitlines():
                values = [v.strip() for v in line.split(",")]
                gpu = dict(zip(fields, values))
                gpu["clock_event_reasons"] = _reasons(gpu.pop(reason_field, ""))
                gpus.append(gpu)
            return {"gpus": gpus, "command": " ".join(command[1:])}
        last = (done.stderr or done.stdout).strip()[:300]
    return {"nvidia_smi": f"failed (rc {done.returncode}): {last}"}


@contextlib.contextmanager
def timing_controls(enabled: bool, *, threads: int | None = 1, core: int | None = None) -> Iterator[dict]:
    """Inside: where ``enabled``, the calling thread :func:`pinned` and torch on ``threads`` threads (None:
    left as it is); ``gpu_state`` read before (and after, into the yielded record, when the context ends).
    Disabled: yields ``{"enabled": False}`` and does nothing."""
    record: dict = {"enabled": enabled}
    if not enabled:
        yield record
        return
    record["gpu_before"] = gpu_state()
    with contextlib.ExitStack() as stack:
        record.update(stack.enter_context(pinned(core)))
        if threads is not None:
            record["threads_before"] = stack.enter_context(host_threads(threads))
        record["threads"] = torch.get_num_threads()
        record["gc"] = "paused per configuration (a collection before each)"
        try:
            yield record
        finally:
            record["gpu_after"] = gpu_state()
