"""What every stream engine has, CPU and GPU alike: the engines' config (:mod:`.engine_config`), the
stream surface with its results and statistics (:mod:`.stream_surface`), admission, aging and timings.

Imports :mod:`earlyexit_kernels.engine.step` and :mod:`earlyexit_kernels.engine.layers`; never
:mod:`earlyexit_kernels.engine.graphed`.
"""
