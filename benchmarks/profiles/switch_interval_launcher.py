"""``eek`` with Python's thread switch interval set from ``EEK_SWITCH`` (seconds; default 0.005, Python's own):
a launcher for ``request_latency_parts.py --launcher``, to see whether the event loop's thread waiting
for the GIL behind the engine's makes the tail::

    EEK_SWITCH=0.0005 python benchmarks/profiles/request_latency_parts.py FOLDER TEXTS.txt \\
        --launcher benchmarks/profiles/switch_interval_launcher.py
"""

import os
import runpy
import sys

sys.setswitchinterval(float(os.environ.get("EEK_SWITCH", "0.005")))
sys.argv = ["earlyexit_kernels", *sys.argv[1:]]
runpy.run_module("earlyexit_kernels", run_name="__main__", alter_sys=True)
