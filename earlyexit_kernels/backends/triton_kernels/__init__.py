"""Triton kernels of earlyexit_kernels, one module per kernel.

- :mod:`.exit_step`: the fused default head + exit step (``earlyexit::exit_head``,
  ``earlyexit::exit_decide``).
- :mod:`.compact`: the compaction gather (``earlyexit::compact``).

Importing these modules needs ``triton``; :mod:`earlyexit_kernels.backends.triton_backend`
registers them as the ``"triton"`` backend when it is importable.
"""
