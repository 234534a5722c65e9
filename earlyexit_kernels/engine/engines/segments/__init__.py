"""The segment engine (opt-in on CUDA): the graphed step run a segment of layers at a time (:mod:`.step`),
cohorts refilled between segments (:mod:`.engine`). Deleting it touches this folder, its tests and its
benchmark rows, and one line of :mod:`earlyexit_kernels.engine.engines.choice`.
"""
