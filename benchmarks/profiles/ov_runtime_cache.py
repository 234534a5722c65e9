"""eek's command line with the OpenVINO CPU plugin's runtime cache held to ``$OV_RUNTIME_CACHE_CAPACITY`` entries per
compiled model (:data:`~earlyexit_kernels.engine.layers.ov_layer.RUNTIME_CACHE_CAPACITY`; unset: the plugin's default):
the wrapper a soak gives each server to weigh the cache's memory against its speed::

    python benchmarks/profiles/serve_memory_profile.py FOLDER TEXTS.txt --wrapper benchmarks/profiles/ov_runtime_cache.py \\
        --setting "plugin default:--dtype int8" "cache 1000:--dtype int8|OV_RUNTIME_CACHE_CAPACITY=1000" --rounds 2
"""

import os
import runpy
import sys

from earlyexit_kernels.engine.layers import ov_layer

if __name__ == "__main__":
    value = os.environ.get("OV_RUNTIME_CACHE_CAPACITY")
    if value is not None:
        if not value.isdigit():
            sys.exit(f"OV_RUNTIME_CACHE_CAPACITY is {value!r}: give a count of entries (0 or more)")
        ov_layer.RUNTIME_CACHE_CAPACITY = int(value)
    if "--" not in sys.argv:
        sys.exit("usage: ov_runtime_cache.py -- EEK ARGUMENTS (eek's command line after --)")
    sys.argv = ["earlyexit_kernels", *sys.argv[sys.argv.index("--") + 1 :]]
    runpy.run_module("earlyexit_kernels", run_name="__main__", alter_sys=True)
