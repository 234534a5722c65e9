"""Which int8 kernels this CPU runs: the instruction set an int8 certificate holds for.

The int8 bases (:mod:`earlyexit_kernels.engine.precision`: PyTorch's per-token int8 Linear and the
ONNX Runtime layers) choose their integer GEMM by the CPU's instruction set. With VNNI (AVX-512 VNNI,
AVX-VNNI, or AMX) each u8 x s8 product is accumulated in 32 bits, exactly. Without it (AVX2, or
AVX-512 without VNNI) ONNX Runtime's u8s8 kernel adds pairs of products in saturating 16-bit sums
(``vpmaddubsw``; its quantization documentation recommends reduced-range weights there), so the same
int8 folder computes other values, and a threshold certified on one class is not certified on the
other: on an AVX2-only AMD EPYC the ONNX Runtime layer differed from the per-token layer by 1.4x what
int8 itself moves, where the machines its test was written on measured 0.001-0.024x (issue 95).

A folder certified on int8 records the class it was certified on (``eek_fit.json``'s ``int8_isa``);
:func:`earlyexit_kernels.integrations.model_folder.load_model` warns where it runs int8 on another.
"""

from __future__ import annotations

import functools
import platform

__all__ = ["int8_isa", "isa_class", "cpu_flags", "CLASSES"]

#: the classes, each a way the int8 GEMMs accumulate: ``vnni`` (exact 32-bit sums), ``avx512`` and
#: ``avx2`` (ONNX Runtime's u8s8 pairs saturate in 16 bits), else the machine's name (``aarch64``, ...)
CLASSES = ("vnni", "avx512", "avx2")


def isa_class(flags: set[str], machine: str) -> str:
    """The int8 class of a CPU with ``flags`` (``/proc/cpuinfo``'s names) on ``machine`` (``platform.machine()``)."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return machine.lower() or "unknown"
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "x86"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or an empty set where it cannot be read (the
    one reader: :func:`~earlyexit_kernels.engine.int8_linear.cpu_has_vnni` and the benchmark's
    ``instruction_sets`` read it too)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def int8_isa() -> str:
    """This CPU's int8 class (:func:`isa_class`); ``unknown`` where an x86 CPU's flags cannot be read."""
    flags, machine = cpu_flags(), platform.machine()
    if not flags and machine.lower() in ("x86_64", "amd64"):
        return "unknown"
    return isa_class(flags, machine)
