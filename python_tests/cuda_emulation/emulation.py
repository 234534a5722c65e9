"""Build csrc/cuda's kernels and CUDA binding for the CPU emulation (include/emu_cuda.h).

``load()`` returns the ``torch.ops.eek_emu`` namespace: the ops of ``csrc/bindings.cpp``
(``cpp_head``, ``cpp_exit_step``, ``cpp_head_exit_step``, ``cpp_compact``, ``cpp_gather_survivors``, ...) implemented by
``csrc/bindings_cuda.cpp`` and the CUDA kernels, compiled with g++ and run on CPU tensors:
the same source, with three mechanical rewrites (kernel launches, dynamic shared memory,
``is_cuda`` checks) and the registration under ``eek_emu`` for the CPU. Needs g++ and the
CUDA toolkit's headers (``cuda_fp16.h``, ``cuda_bf16.h``, ``vector_types.h``); ``reason()``
says why not when they are missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"


def cuda_include() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_fp16.h").exists():
            return Path(candidate) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        include = Path(nvcc).resolve().parents[1] / "include"
        if (include / "cuda_fp16.h").exists():
            return include
    return None


def reason() -> str | None:
    """None when the emulation can be built here, else why not."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++)"
    if cuda_include() is None:
        return "the CUDA toolkit's headers (cuda_fp16.h) are not installed"
    return None


KERNEL_FILES = ("exit_step_emu.cpp", "compact_emu.cpp", "gather_survivors_emu.cpp", "pool_norm_emu.cpp")
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(")


def _rewrite_kernels(text: str) -> str:
    text = LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, ", text)
    text = text.replace(
        "extern __shared__ __align__(16) unsigned char smem[];", "unsigned char* smem = ::emu::dynamic_shared();"
    )
    assert "<<<" not in text and "extern __shared__" not in text, "a launch or shared array the build cannot rewrite"
    return text


def _rewrite_binding(text: str) -> str:
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = text.replace("TORCH_LIBRARY_IMPL(earlyexit, CUDA, m)", "TORCH_LIBRARY_IMPL(eek_emu, CPU, m)")
    assert "CUDA, m)" not in text
    return text


def _schemas() -> str:
    text = (CSRC / "bindings.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY_FRAGMENT\(earlyexit, m\) \{.*?\n\}", text, re.S)
    assert block is not None, "the op schemas in csrc/bindings.cpp"
    return (
        '#include "emu_runtime.inc"\n#include <torch/library.h>\n\n'
        + block.group(0).replace("(earlyexit, m)", "(eek_emu, m)")
        + "\n"
    )


@functools.lru_cache(maxsize=1)
def load():
    """Compile (cached by the sources' hash) and load the emulated ops; ``torch.ops.eek_emu``."""
    import torch
    from torch.utils import cpp_extension

    sources = {
        "exit_step_emu.cpp": _rewrite_kernels((CSRC / "cuda" / "exit_step.cu").read_text()),
        "compact_emu.cpp": _rewrite_kernels((CSRC / "cuda" / "compact.cu").read_text()),
        "gather_survivors_emu.cpp": _rewrite_kernels((CSRC / "cuda" / "gather_survivors.cu").read_text()),
        "pool_norm_emu.cpp": _rewrite_kernels((CSRC / "cuda" / "pool_norm.cu").read_text()),
        # the argument checks the CUDA binding shares with the CPU op (plain ATen)
        "gather_survivors_checks_emu.cpp": (CSRC / "cpu" / "gather_survivors_cpu.cpp").read_text(),
        "bindings_cuda_emu.cpp": _rewrite_binding((CSRC / "bindings_cuda.cpp").read_text()),
        "schemas_emu.cpp": _schemas(),
    }
    headers = [p.read_text() for p in sorted((CSRC / "cuda").glob("*.h"))] + [
        p.read_text() for p in sorted(CSRC.glob("**/*.h")) if "cuda" not in p.parts
    ]
    headers += [p.read_text() for p in sorted((HERE / "include").rglob("*")) if p.is_file()]
    cflags = ["-O1", "-w", "-DEEK_WITH_CUDA=1", "-ffp-contract=off", "-include", "emu_cuda.h"]
    # The emulated runtime defines cudaGetLastError, cudaMemsetAsync, ...: where torch has loaded
    # the real libcudart (a GPU machine), its symbols would win over ours without -Bsymbolic.
    ldflags = ["-Wl,-Bsymbolic"]
    digest = hashlib.sha256("\0".join([*sources.values(), *headers, *cflags, *ldflags]).encode()).hexdigest()[:16]
    build = Path(os.environ.get("EEK_EMU_BUILD_DIR", Path.home() / ".cache" / "eek_cuda_emulation")) / digest
    build.mkdir(parents=True, exist_ok=True)
    # The rewritten files include csrc headers by their csrc-relative paths.
    (build / "cuda").mkdir(exist_ok=True)
    for name, text in sources.items():
        target = build / ("cuda" if name in KERNEL_FILES else "") / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    paths = [str(build / "cuda" / name) for name in KERNEL_FILES]
    paths += [str(build / name) for name in ("bindings_cuda_emu.cpp", "gather_survivors_checks_emu.cpp")]
    paths += [str(build / "schemas_emu.cpp")]
    cpp_extension.load(
        name=f"eek_emu_{digest}",
        sources=paths,
        extra_include_paths=[str(HERE / "include"), str(CSRC), str(CSRC / "cuda"), str(cuda_include())],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.eek_emu
