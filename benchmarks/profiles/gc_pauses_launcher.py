"""``eek`` with a probe on Python's garbage collector: every collection of the oldest generation (and any other
over 5 ms) is written to ``EEK_GC_LOG`` (default ``gc_pauses.log`` in the working folder) as a line: the time on
the machine's monotonic clock (s), the generation, its duration (ms), the objects it collected and, for the
oldest, the objects tracked. A launcher for ``level_transient.py`` and ``request_latency_parts.py``::

    EEK_GC_LOG=/tmp/gc.log python benchmarks/profiles/level_transient.py FOLDER TEXTS.txt \\
        --launcher benchmarks/profiles/gc_pauses_launcher.py
"""

import gc
import os
import runpy
import sys
import time

_log = open(os.environ.get("EEK_GC_LOG", "gc_pauses.log"), "a", buffering=1)  # noqa: SIM115 (the process's life)
_started = {}


def _watch(phase, info):
    if phase == "start":
        _started["at"] = time.perf_counter()
        return
    ms = 1000 * (time.perf_counter() - _started.get("at", time.perf_counter()))
    if info["generation"] == 2 or ms > 5:
        tracked = len(gc.get_objects()) if info["generation"] == 2 else -1  # after the timing: not in it
        _log.write(
            f"{time.monotonic():.3f} gen {info['generation']} {ms:.1f} ms collected {info['collected']} "
            f"tracked {tracked}\n"
        )


gc.callbacks.append(_watch)
sys.argv = ["earlyexit_kernels", *sys.argv[1:]]
runpy.run_module("earlyexit_kernels", run_name="__main__", alter_sys=True)
