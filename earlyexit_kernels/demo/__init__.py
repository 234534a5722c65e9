"""The demo: the package's own task (:mod:`.task`) and the report that trains, calibrates and
times every method on it (:mod:`.report`). Run it with ``python -m earlyexit_kernels.demo``.
"""
