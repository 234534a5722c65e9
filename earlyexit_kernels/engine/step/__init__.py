"""One exact early-exit step over a batch: the start state, the token inputs' checks, the per-batch loop
(:mod:`.batch_loop`), the exit heads, the step's choice (exact or graphed) and the patched record.

Imports only :mod:`earlyexit_kernels.engine.layers` among the wings.
"""
