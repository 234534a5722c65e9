"""The packed-token engine (opt-in on CUDA): cohorts whose rows are packed into one token axis with varlen
attention (:mod:`.token_step`, :mod:`.engine`). Deleting it touches this folder, its tests and its
benchmark rows, and one line of :mod:`earlyexit_kernels.engine.engines.choice`.
"""
