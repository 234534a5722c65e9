"""What the repository's studies share, and the writers of the results sections in ``docs/``: the peer
comparisons (Infinity, the smaller model, the int8/bf16/compile stack), the quality studies on real
tasks, the replay of online re-certification, and the reports. They build on the installed
benchmarks (``earlyexit_kernels.bench``: ``eek bench sweep|stream|serve``) and are run from the
repository's root, ``python -m benchmarks.suite.<module>``; nothing in the package imports them.
"""
