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

libstdc++ is always linked as the shared library (``extension_link_args``), never copied into
``_C``: ``-static-libstdc++``/``-static-libgcc`` in ``LDFLAGS`` and the other compiler variables
are dropped, with a note. The build prints its link command (``earlyexit_kernels build: link
args ...``); ``scripts/check_libstdcxx.sh`` fails where an extension defines libstdc++'s stream
or locale code itself.

Without torch at build time the pure-Python package is installed, with a note.
"""

from __future__ import annotations

import os
import shlex
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


def _compiles(source: str, args: list[str]) -> bool:
    """Whether the C++ compiler (``$CXX``, else c++ or g++) takes ``source`` with these arguments
    (``-o`` a file in a temporary folder appended)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        result = subprocess.run(
            [*shlex.split(compiler), src, *args, "-o", os.path.join(tmp, "probe.out")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return result.returncode == 0


def _compiler_accepts(flag: str) -> bool:
    return _compiles("int main() { return 0; }\n", [flag, "-c"])


# libstdc++ is linked as the shared library, never into the extension. The first GPU session's
# CUDA build of _C defined libstdc++'s stream code itself (std::ostream::_M_insert<long>), and
# that copy segfaulted against the process's libstdc++ on any C++ error message with a number
# in it (docs/development.md). "-l:libstdc++.so.6" names the shared library, after the objects
# and ahead of the -lstdc++ the compiler driver appends, so libstdc++'s symbols resolve to it
# even where a -static-libstdc++ escapes the stripping below (e.g. one baked into Python's
# LDSHARED). scripts/check_cuda_compile.sh links a small C++ and CUDA object with exactly
# these arguments and scripts/check_libstdcxx.sh checks the result (and the built _C).
LIBSTDCXX_SHARED = "-l:libstdc++.so.6"
# -static-libstdc++ copies libstdc++ into the extension; -static-libgcc copies libgcc's unwinder,
# a second one beside the process's libgcc_s, which C++ exceptions thrown across the two then
# cross. Neither belongs in a Python extension, whose process has both shared libraries loaded.
STATIC_RUNTIME_FLAGS = ("-static-libstdc++", "-static-libgcc")
# What distutils puts on the link line from the environment (sysconfig's customize_compiler).
LINK_ENVIRONMENT = ("LDFLAGS", "LDSHARED", "LDCXXSHARED", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "CC", "CXX")


def _links_with(args: list[str]) -> bool:
    """Whether the C++ compiler links a shared object with these extra arguments."""
    return _compiles("int eek_probe() { return 0; }\n", ["-shared", "-fPIC", *args])


def extension_link_args() -> list[str]:
    """The extra link arguments of the extension, CPU and CUDA builds alike (one list, read by
    scripts/check_cuda_compile.sh too): libstdc++ as the shared library on Linux."""
    if not sys.platform.startswith("linux"):
        return []
    if not _links_with([LIBSTDCXX_SHARED]):
        _note(f"the linker does not take {LIBSTDCXX_SHARED}; linking as the compiler driver does")
        return []
    return [LIBSTDCXX_SHARED]


def strip_static_runtime(words: list[str]) -> list[str]:
    return [w for w in words if w not in STATIC_RUNTIME_FLAGS]


def strip_static_runtime_from_environment() -> None:
    """Drop -static-libstdc++/-static-libgcc from the variables distutils links with (see
    STATIC_RUNTIME_FLAGS for why)."""
    for name in LINK_ENVIRONMENT:
        value = os.environ.get(name)
        if not value:
            continue
        words = shlex.split(value)
        kept = strip_static_runtime(words)
        if kept != words:
            os.environ[name] = shlex.join(kept)
            dropped = " ".join(w for w in words if w in STATIC_RUNTIME_FLAGS)
            _note(f"dropped {dropped} from ${name}: libstdc++ must stay a shared library (docs/development.md)")


def _strip_static_runtime_from_compiler(compiler) -> None:
    """The same for the commands Python's own build configuration gave distutils."""
    for name in ("linker_so", "linker_so_cxx", "compiler_cxx", "compiler_so"):
        words = getattr(compiler, name, None)
        if isinstance(words, list) and strip_static_runtime(words) != words:
            setattr(compiler, name, strip_static_runtime(words))
            _note(f"dropped {' '.join(w for w in words if w in STATIC_RUNTIME_FLAGS)} from the compiler's {name}")


def _print_link_line(compiler, output: str) -> None:
    """Print each command that links ``output``, when it runs, on one line (object files
    counted): ``pip install -v`` keeps it in the log."""
    last = []

    def wrap(method):
        def run(cmd, *args, **kwargs):
            words = [os.fspath(w) for w in cmd]
            if "-c" not in words and "-o" in words[:-1]:
                target = words[words.index("-o") + 1]
                if os.path.basename(target) == os.path.basename(output) and words not in last:
                    last[:] = [words]  # once, where spawn hands the command on to call
                    objects = [i for i, w in enumerate(words) if w.endswith(".o")]
                    line = [w for i, w in enumerate(words) if i not in objects[1:]]
                    if objects:
                        line[objects[0]] = f"<{len(objects)} object files>"
                    print(f"earlyexit_kernels build: link args {shlex.join(line)}", file=sys.stderr, flush=True)
            return method(cmd, *args, **kwargs)

        return run

    # distutils links through Compiler.call (recent setuptools) or Compiler.spawn (older ones).
    for name in ("call", "spawn"):
        if callable(getattr(compiler, name, None)):
            setattr(compiler, name, wrap(getattr(compiler, name)))


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
        f"{csrc}/cpu/gather_survivors_cpu.cpp",
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
    link_args = extension_link_args()
    include_dirs = [os.path.join(ROOT, csrc)]

    why_not = _cuda_build_possible(torch, CUDA_HOME)
    if why_not is not None and _flag("EARLYEXIT_FORCE_CUDA_BUILD"):
        raise RuntimeError(f"EARLYEXIT_FORCE_CUDA_BUILD is set but the CUDA kernels cannot be built: {why_not}")
    if _flag("EARLYEXIT_SKIP_EXTENSION_BUILD"):
        _note("EARLYEXIT_SKIP_EXTENSION_BUILD is set: installing without the C++ extension")
        return [], {}
    if why_not is None:
        cuda_sources = [f"{csrc}/bindings_cuda.cpp"]
        cuda_sources += [f"{csrc}/cuda/{name}.cu" for name in ("exit_step", "compact", "gather_survivors", "pool_norm")]
        nvcc = ["-O3", "-Xptxas=-warn-spills", *_cuda_arch_flags()]
        ext = CUDAExtension(
            "earlyexit_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[*macros, ("EEK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
        )
        _note(f"building the CPU and CUDA kernels (MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        ext = CppExtension(
            "earlyexit_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link_args,
        )
        _note(f"building the CPU kernels only: {why_not}")
    from torch.utils.cpp_extension import is_ninja_available

    class BuildWithCpuFallback(BuildExtension):
        """A CUDA build that fails (compiler, headers, toolkit) falls back to the CPU kernels."""

        def build_extension(self, extension):
            _strip_static_runtime_from_compiler(self.compiler)
            _print_link_line(self.compiler, self.get_ext_fullpath(extension.name))
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


# Run by pip and setuptools (as __main__); scripts/check_cuda_compile.sh loads this file under
# another name for extension_link_args and strip_static_runtime alone.
if __name__ == "__main__":
    strip_static_runtime_from_environment()
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
