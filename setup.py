"""Build of earlyexit_kernels.

The pure-Python package (PyTorch reference, Hugging Face drop-in, Triton kernels)
installs everywhere. Install with ``pip install --no-build-isolation .`` so that the
compiled part, ``earlyexit_kernels._C``, is built against the torch already installed:

- always the CPU kernels (``csrc/cpu``, ``csrc/bindings.cpp``), with ``-O3``;
- the CUDA kernels too (``csrc/cuda``, ``csrc/bindings_cuda.cpp``) when torch was built
  with CUDA and ``nvcc`` is found. No GPU is needed at build time.

Environment switches:

- ``EARLYEXIT_SKIP_CUDA_BUILD=1``: CPU kernels only.
- ``EARLYEXIT_SKIP_EXTENSION_BUILD=1``: no compiled part at all (the PyTorch reference and the
  Triton kernels); an install in seconds, e.g. the GPU script's CPU dress rehearsal.
- ``EARLYEXIT_FORCE_CUDA_BUILD=1``: fail, instead of falling back to a CPU-only build,
  when the CUDA kernels cannot be built (for CI images that must ship them).
- ``EARLYEXIT_CUDA_ARCHS``: ``;``-separated compute capabilities, default ``"80;90"``;
  SASS for each and PTX for the newest.
- ``MAX_JOBS``: parallel compile jobs; when unset, from the free memory (about 2 GiB
  per job) and the CPU count.

Without torch at build time the pure-Python package is installed, with a note.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _note(message: str) -> None:
    print(f"earlyexit_kernels setup: {message}", file=sys.stderr)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _free_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return None


def _set_max_jobs() -> None:
    if os.environ.get("MAX_JOBS"):
        return
    jobs = os.cpu_count() or 1
    free = _free_memory_gib()
    if free is not None:
        jobs = min(jobs, int(free // 2))
    os.environ["MAX_JOBS"] = str(max(1, jobs))


def _compiler_accepts(flag: str) -> bool:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        result = subprocess.run(
            [compiler, flag, "-c", src, "-o", os.path.join(tmp, "probe.o")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return result.returncode == 0


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("EARLYEXIT_CUDA_ARCHS", "80;90").split(";")]
    archs = [a for a in archs if a]
    if not archs:
        raise RuntimeError("EARLYEXIT_CUDA_ARCHS is empty; give e.g. '80;90'")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit())))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _cuda_build_possible(torch, cuda_home) -> str | None:
    """None when the CUDA kernels can be built, otherwise why not."""
    if _flag("EARLYEXIT_SKIP_CUDA_BUILD"):
        return "EARLYEXIT_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # noqa: BLE001 - any failure means: no extension
        _note(f"torch is not importable ({type(err).__name__}: {err}); installing without the C++ extension")
        return [], {}

    _set_max_jobs()
    csrc = "csrc"
    cpu_sources = [
        f"{csrc}/bindings.cpp",
        f"{csrc}/cpu/exit_step_cpu.cpp",
        f"{csrc}/cpu/pooler_head_cpu.cpp",
        f"{csrc}/cpu/pooled_head_step_cpu.cpp",
        f"{csrc}/cpu/compact_cpu.cpp",
        f"{csrc}/cpu/token_pool_cpu.cpp",
        f"{csrc}/cpu/bert_layer_cpu.cpp",
    ]
    cxx = ["-O3", "-ffp-contract=off"]
    # No -fopenmp: at::parallel_for is inline in ATen's headers and, built without OpenMP, runs
    # its body on the calling thread, so the CPU kernels are single-threaded (small per-layer
    # work; cpp_backend hands large heads to torch's threaded GEMM). They use only the OpenMP
    # SIMD pragmas, which need no runtime library.
    if _compiler_accepts("-fopenmp-simd"):
        cxx.append("-fopenmp-simd")
    if _compiler_accepts("-Wno-psabi"):  # GCC's note on passing AVX vectors (always inlined here)
        cxx.append("-Wno-psabi")
    macros = [("EEK_TORCH_VERSION", f'"{torch.__version__}"')]
    include_dirs = [os.path.join(ROOT, csrc)]

    why_not = _cuda_build_possible(torch, CUDA_HOME)
    if why_not is not None and _flag("EARLYEXIT_FORCE_CUDA_BUILD"):
        raise RuntimeError(f"EARLYEXIT_FORCE_CUDA_BUILD is set but the CUDA kernels cannot be built: {why_not}")
    if _flag("EARLYEXIT_SKIP_EXTENSION_BUILD"):
        _note("EARLYEXIT_SKIP_EXTENSION_BUILD is set: installing without the C++ extension")
        return [], {}
    if why_not is None:
        cuda_sources = [f"{csrc}/bindings_cuda.cpp"]
        cuda_sources += [f"{csrc}/cuda/{name}.cu" for name in ("exit_step", "compact", "pool_norm")]
        nvcc = ["-O3", "-Xptxas=-warn-spills", *_cuda_arch_flags()]
        ext = CUDAExtension(
            "earlyexit_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[*macros, ("EEK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
        _note(f"building the CPU and CUDA kernels (MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        ext = CppExtension(
            "earlyexit_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
        )
        _note(f"building the CPU kernels only: {why_not}")
    from torch.utils.cpp_extension import is_ninja_available

    class BuildWithCpuFallback(BuildExtension):
        """A CUDA build that fails (compiler, headers, toolkit) falls back to the CPU kernels."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001 - any failure of the CUDA part
                if why_not is not None or _flag("EARLYEXIT_FORCE_CUDA_BUILD"):
                    raise
                _note(f"the CUDA kernels failed to build ({type(err).__name__}: {err}); building the CPU kernels only")
                extension.sources = [s for s in extension.sources if s in cpu_sources]
                extension.define_macros = [m for m in extension.define_macros if m[0] != "EEK_WITH_CUDA"]
                super().build_extension(extension)

    build_ext = BuildWithCpuFallback.with_options(use_ninja=is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
