"""libstdc++ stays a shared library of the extension: the first GPU session's CUDA build of ``_C``
carried its own copy of libstdc++'s stream code, and a C++ error message with a number in it
segfaulted (docs/development.md). setup.py links with ``extension_link_args`` and drops
``-static-libstdc++``/``-static-libgcc`` from the environment; scripts/check_libstdcxx.sh fails on
a shared object that defines that code itself (``make test`` runs it on the built extension,
``make cuda-check`` on C++ and CUDA objects linked like the extension)."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
CHECK = REPOSITORY / "scripts" / "check_libstdcxx.sh"
PROBE = r"""
#include <sstream>
#include <stdexcept>
void eek_probe_check(long index, long rows) {
    if (index >= rows) {
        std::ostringstream message;
        message << "index " << index << " out of range for " << rows << " rows";
        throw std::out_of_range(message.str());
    }
}
"""

needs_linux_toolchain = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (shutil.which("g++") and shutil.which("nm")),
    reason="needs Linux, g++ and nm",
)


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup()."""
    return runpy.run_path(str(REPOSITORY / "setup.py"), run_name="eek_setup_flags")


@needs_linux_toolchain
def test_the_extension_links_libstdcxx_as_the_shared_library(setup_py):
    assert setup_py["extension_link_args"]() == ["-l:libstdc++.so.6"]


def test_static_runtime_flags_are_dropped_from_the_environment(setup_py, monkeypatch):
    monkeypatch.setenv("LDFLAGS", "-L/opt/lib -static-libstdc++ -Wl,-O1 -static-libgcc")
    monkeypatch.setenv("CXX", "g++ -static-libstdc++")
    monkeypatch.setenv("CFLAGS", "-O2")
    setup_py["strip_static_runtime_from_environment"]()
    assert os.environ["LDFLAGS"] == "-L/opt/lib -Wl,-O1"
    assert os.environ["CXX"] == "g++"
    assert os.environ["CFLAGS"] == "-O2"


@needs_linux_toolchain
def test_the_check_catches_a_static_libstdcxx_and_setup_s_link_args_keep_it_out(setup_py, tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)
    subprocess.run(
        ["g++", "-std=c++17", "-O2", "-fPIC", "-c", str(source), "-o", str(tmp_path / "probe.o")], check=True
    )

    def link(name, ahead, behind=()):
        """g++ -shared AHEAD probe.o BEHIND, as distutils puts LDSHARED before the objects and the
        extension's extra_link_args after them."""
        command = ["g++", "-shared", *ahead, str(tmp_path / "probe.o"), *behind, "-o", str(tmp_path / name)]
        return subprocess.run(command, capture_output=True).returncode == 0

    def check(name):
        return subprocess.run(["bash", str(CHECK), str(tmp_path / name)], capture_output=True, text=True)

    if not link("static.so", ["-static-libstdc++"]):
        pytest.skip("no libstdc++.a here")
    failed = check("static.so")
    assert failed.returncode != 0
    assert "_M_insert<long>(long)" in failed.stderr and "-l:libstdc++.so.6" in failed.stderr

    # A -static-libstdc++ ahead on the line (one in Python's LDSHARED) loses to setup.py's link args.
    assert link("static_ahead.so", ["-static-libstdc++"], setup_py["extension_link_args"]())
    passed = check("static_ahead.so")
    assert passed.returncode == 0, passed.stderr
