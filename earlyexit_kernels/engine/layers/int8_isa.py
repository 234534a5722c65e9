"""Which int8 kernels this CPU runs, and so the int8 form that is exact on it.

The int8 bases (:mod:`earlyexit_kernels.engine.layers.precision`: PyTorch's per-token int8 Linear on fbgemm,
and the ONNX Runtime layers on MLAS) choose their integer GEMM by the CPU's instruction set:

- With VNNI each u8 x s8 product is accumulated in 32 bits, exactly, whatever the operands.
- Without it (AVX2, or AVX-512 without VNNI) both libraries multiply u8 activations by s8 weights
  with ``vpmaddubsw``, which adds each pair of products in a *saturating* 16-bit sum: full-range
  operands (255 x 127, twice: 64,770) overflow it. Each library documents its way round:
  PyTorch's x86 observers quantize activations to 7 bits (``reduce_range``); ONNX Runtime's
  quantizer advises 7-bit weights (``reduce_range``), and its ``session.x64quantprecision``
  transformer turns s8 weights outside [-64, 64] into u8 for a slower exact kernel.

So the int8 form follows the class (:func:`int8_weight_bits`): 8-bit weights and activations on the
``vnni`` class, 7-bit weights with 8-bit activations elsewhere (2 x 255 x 63 = 32,130 < 32,767: no
pair saturates). Both libraries then compute the same exact integer products of the same operands,
so the two recipes agree on every x86 CPU up to float rounding. 7-bit weights rather than PyTorch's
7-bit activations: ONNX Runtime's ``DynamicQuantizeMatMul`` quantizes the activations itself, to 8 bits,
and 7-bit weights kept at least the agreement with float32 that 7-bit activations kept, at full depth
(``benchmarks/micro/int8_forms.py``; docs/serving.md, "One int8 form per CPU class").

Why fbgemm's VNNI needs AVX-512: fbgemm has no AVX-VNNI (256-bit) kernels, so a CPU with AVX-VNNI
but no AVX-512 VNNI (Alder Lake, Sierra Forest) runs its AVX2 kernels and takes the 7-bit form. The
environment variable ``FBGEMM_ENABLE_INSTRUCTIONS`` caps fbgemm's kernels (``AVX2``, ``AVX512``:
without VNNI); the class follows the cap, which is how ``make test-cpu-kinds`` runs the int8 tests as
on an AVX2-only CPU. ONNX Runtime's MLAS takes its kernel from CPUID, with no cap: on a capped VNNI
machine it runs the 7-bit form on its exact VNNI kernel. Its AVX2 kernels (and OpenVINO's) run in
``make test-cpu-kinds``' last level, on an emulated AVX2-only CPU (``qemu-x86_64 -cpu EPYC-Rome``); the class
is read from CPUID (:func:`kernel_flags`) so that it is the one those kernels see.

Before this form, an AVX2-only AMD EPYC ran PyTorch's 8-bit weights with 7-bit activations and ONNX
Runtime's 7-bit weights with 8-bit activations: two quantizations, which differed by 1.4x what int8
itself moves, where the test expected two kernels' rounding (issue 95).

A folder certified on int8 records the class it was certified on (``eek_fit.json``'s ``int8_isa``);
:func:`earlyexit_kernels.integrations.model_folder.load_model` warns where it runs int8 on another.
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["int8_isa", "isa_class", "int8_weight_bits", "cpu_flags", "kernel_flags", "CLASSES", "FBGEMM_CAP"]

#: the classes, each a way the int8 GEMMs accumulate: ``vnni`` (exact 32-bit sums), ``avx512`` and
#: ``avx2`` (16-bit pair sums that saturate on full-range operands), else the machine's name (``aarch64``, ...)
CLASSES = ("vnni", "avx512", "avx2")
#: the environment variable that caps fbgemm's kernels (read by fbgemm itself, case-insensitively)
FBGEMM_CAP = "FBGEMM_ENABLE_INSTRUCTIONS"
#: what each cap leaves fbgemm: whether VNNI, whether AVX-512 (an unknown value leaves the CPU's own)
_CAPS = {"AVX2": (False, False), "AVX512": (False, True), "AVX512_256": (False, True)}


def isa_class(flags: set[str], machine: str, fbgemm_cap: str | None = None) -> str:
    """The int8 class of a CPU with ``flags`` (``/proc/cpuinfo``'s names) on ``machine`` (``platform.machine()``),
    with fbgemm capped by ``fbgemm_cap`` (:data:`FBGEMM_CAP`'s value; None: not capped)."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return machine.lower() or "unknown"
    vnni, avx512 = "avx512_vnni" in flags, "avx512bw" in flags
    capped = _CAPS.get((fbgemm_cap or "").upper())
    if capped is not None:
        vnni, avx512 = vnni and capped[0], avx512 and capped[1]
    if vnni:
        return "vnni"
    if avx512:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "x86"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or an empty set where it cannot be read (the
    one reader: the int8 class here, the benchmark's ``instruction_sets`` and the stack's flags read it)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: the flags :func:`isa_class` reads, by their names in the cpuinfo library (``torch.cpu.get_capabilities``)
_CPUINFO_NAMES = {"avx512_vnni": "avx512_vnni", "avx512_bw": "avx512bw", "avx2": "avx2"}


def kernel_flags() -> set[str]:
    """The flags the int8 kernels choose by, in ``/proc/cpuinfo``'s names: CPUID as the cpuinfo library reads it
    (``torch.cpu.get_capabilities``, the library fbgemm decides with; ONNX Runtime's MLAS reads CPUID too), else
    :func:`cpu_flags` where this torch has no such function.

    Not ``/proc/cpuinfo`` first: it is the kernel's list, and an emulated CPU (``qemu-x86_64 -cpu EPYC-Rome``, where
    ``make test-cpu-kinds``' last level runs the int8 tests) shows the host's list there while CPUID,
    and so every kernel, sees the emulated one. A class read from the host's list gave 8-bit weights to AVX2 kernels
    that saturate on them."""
    try:
        import torch  # here: the command line's help and fit options read this module without importing torch

        capabilities = torch.cpu.get_capabilities()
    except (ImportError, AttributeError, RuntimeError):
        return cpu_flags()
    return {name for key, name in _CPUINFO_NAMES.items() if capabilities.get(key)}


@functools.lru_cache(maxsize=1)
def int8_isa() -> str:
    """This CPU's int8 class (:func:`isa_class` of :func:`kernel_flags`, with fbgemm's cap as this process has it);
    ``unknown`` where an x86 CPU's flags cannot be read."""
    flags, machine = kernel_flags(), platform.machine()
    if not flags and machine.lower() in ("x86_64", "amd64"):
        return "unknown"
    return isa_class(flags, machine, os.environ.get(FBGEMM_CAP))


def int8_weight_bits(isa: str | None = None) -> int:
    """The bits of the int8 weights on the class ``isa`` (None: this CPU's): 8 where the GEMMs accumulate exactly
    (``vnni``), else 7, the form no 16-bit pair sum can overflow (the module docstring)."""
    return 8 if (int8_isa() if isa is None else isa) == "vnni" else 7
