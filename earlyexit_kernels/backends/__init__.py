"""How the per-layer bookkeeping runs: the exit step, the write-back of exits and the compaction.

:mod:`.registry` holds the backends and picks one (``"torch"`` is the plain-PyTorch
reference: :mod:`.compaction`, :mod:`.write_back` and the exit rules of
:mod:`earlyexit_kernels.methods.exit_rules`); :mod:`.cpp_backend` binds the compiled C++
and CUDA ops, :mod:`.triton_backend` the Triton kernels of :mod:`.triton_kernels`;
:mod:`.choice` times them when ``backend="auto"`` has more than one fast candidate.
"""
