"""The graphed step: the exit step over static buffers, captured in CUDA graphs on a GPU
(:mod:`.static_step`, :mod:`.static_buffers`, :mod:`.step_graphs`), the captured prologue, the survivor
buckets and the layer-cost table that sizes them.

Imports :mod:`earlyexit_kernels.engine.step` and :mod:`earlyexit_kernels.engine.layers`; never
:mod:`earlyexit_kernels.engine.stream`.
"""
