"""eek serve's allocator setting (earlyexit_kernels.integrations.server.memory_trim): what it chooses, and that it returns memory."""

import ctypes
import ctypes.util
import time
from pathlib import Path

import pytest

from earlyexit_kernels.integrations.cli_options import CliError
from earlyexit_kernels.integrations.serve_cli import DEFAULT_INTERVAL as CLI_DEFAULT
from earlyexit_kernels.integrations.serve_cli import memory_trim_interval
from earlyexit_kernels.integrations.server import memory_trim
from earlyexit_kernels.integrations.server.memory_trim import (
    DEFAULT_INTERVAL,
    preloaded_allocator,
    start_memory_trim,
)

GLIBC = memory_trim._glibc_malloc_trim() is not None
PLAIN_MAPS = "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def test_the_command_line_default_is_the_module_s():
    assert CLI_DEFAULT == DEFAULT_INTERVAL


def test_the_flag_reads_seconds_or_off_and_refuses_the_rest():
    assert memory_trim_interval("off") == 0.0
    assert memory_trim_interval("OFF") == 0.0
    assert memory_trim_interval("2.5") == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(CliError, match="--memory-trim must be a number of seconds > 0, or off"):
            memory_trim_interval(bad)


def test_off_leaves_the_allocator_alone():
    trim = start_memory_trim(0)
    assert not trim.running and "left as it is" in trim.line
    with pytest.raises(ValueError, match=">= 0 seconds"):
        start_memory_trim(-1)


def test_a_preloaded_allocator_is_left_to_return_memory_itself():
    maps = PLAIN_MAPS + "7f10-7f11 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert preloaded_allocator(maps) == "jemalloc"
    assert preloaded_allocator(PLAIN_MAPS) is None
    trim = start_memory_trim(1.0, maps=maps)
    assert not trim.running and "jemalloc is preloaded" in trim.line


def _resident_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_on_glibc_the_trim_runs_and_gives_freed_memory_back():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MiB in 100 KiB blocks (under glibc's 128 KiB mmap threshold: from the heap), touched, then
    # all freed but the last, which keeps the heap's top in place: free alone returns none of it
    size, count = 100 * 1024, 640
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks[:-1]:
        libc.free(block)
    held = _resident_kib()
    trim = start_memory_trim(0.05)
    try:
        assert trim.running and "malloc_trim" in trim.line and "--memory-trim off" in trim.line
        deadline = time.monotonic() + 10
        while trim.trims < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert trim.trims >= 1
        released = held - _resident_kib()
    finally:
        trim.stop()
        libc.free(blocks[-1])
    assert not trim.running
    assert released > 32 * 1024, f"the trim returned {released} KiB of the 64 MiB freed"


def test_a_process_starts_one_trim_however_often_it_is_asked(monkeypatch):
    # eek serve and each Ray replica ask once per app they build; one trim thread per process
    monkeypatch.setattr(memory_trim, "_process_trim", None)
    assert memory_trim.process_trim_line() is None  # an app built from Python alone starts none
    first = memory_trim.trim_once_per_process(0)
    assert memory_trim.trim_once_per_process(5.0) is first
    assert memory_trim.process_trim_line() == "the allocator left as it is (--memory-trim off)"


def test_ray_replicas_refuse_a_bad_trim_interval_before_starting():
    pytest.importorskip("ray.serve", reason="Ray Serve replicas need ray[serve]")
    from earlyexit_kernels.integrations.server.ray_serve import serve_application

    for bad in (-1, float("inf"), "10", True):
        with pytest.raises(ValueError, match="memory_trim must be a number of seconds >= 0"):
            serve_application("unused-folder", memory_trim=bad)


FLAT_PROBE = """
import ctypes, sys
from earlyexit_kernels.integrations.server.memory_trim import heap_account, start_memory_trim

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
trim = start_memory_trim(60.0, flat=sys.argv[1] == "flat")
# glibc maps a block on its own only when no free chunk of the heap can hold it: a block larger than
# all the heap holds free leaves it no such chunk, whatever the process freed before
size = max(512 << 10, (heap_account()["free"] + (2 << 20)) & ~((1 << 20) - 1))
if size + (4 << 20) > 32 << 20:  # glibc's adaptive threshold stops at 32 MiB
    print("skip the heap holds", heap_account()["free"], "bytes free")
    sys.exit()
# freeing a larger mapped block raises glibc's adaptive threshold above the block: the block then
# comes from the heap, unless the threshold is fixed
libc.free(libc.malloc(size + (4 << 20)))
before = heap_account()["mapped_blocks"]
block = libc.malloc(size)
print(heap_account()["mapped_blocks"] - before, trim.line)
libc.free(block)
trim.stop()
"""


@pytest.mark.skipif(memory_trim.heap_account() is None, reason="mallinfo2 is glibc >= 2.33's")
@pytest.mark.parametrize("mode, mapped", [("flat", 1), ("default", 0)])
def test_flat_memory_maps_the_blocks_that_spread_the_heap_on_their_own(mode, mapped):
    import subprocess
    import sys

    # in a process of its own: mallopt changes the whole process's allocator
    out = subprocess.run([sys.executable, "-c", FLAT_PROBE, mode], capture_output=True, text=True, check=True)
    count, line = out.stdout.split(" ", 1)
    if count == "skip":
        pytest.skip(line)
    assert int(count) == mapped
    assert ("--memory-flat" in line) == (mode == "flat")


def test_flat_memory_needs_the_trim():
    with pytest.raises(ValueError, match="flat memory needs the periodic trim"):
        start_memory_trim(0, flat=True)


def test_the_arena_is_shrunk_only_where_resident_memory_grew():
    # the trim's readings of resident memory (MiB): the first asks for a shrink, the next is its floor;
    # then a shrink only past the floor + 2.5%, and the reading after each shrink is the new floor
    rule = memory_trim.ArenaShrinkRule(growth=0.025)
    readings = [700, 690, 700, 707, 720, 710, 712, 731, 650, 660]
    asked = [rule.should_shrink(mib << 20) for mib in readings]
    # 700: first; 690: floor; 700, 707 (+2.4%): under 690 x 1.025 = 707.25; 720: over; 710: floor;
    # 712; 731 (+3.0% over 710): over; 650: floor; 660 (+1.5%)
    assert asked == [True, False, False, False, True, False, False, True, False, False]
    assert rule.shrinks == 3 and rule.floor == 650 << 20
    # where /proc does not say, every reading shrinks (as before the rule)
    unknown = memory_trim.ArenaShrinkRule()
    assert [unknown.should_shrink(None) for _ in range(3)] == [True, True, True]


def test_the_trim_reads_resident_memory_before_asking_for_a_shrink():
    # the running trim asks ONNX Runtime's arena for a shrink through its rule: once at its first reading,
    # then not while resident memory holds
    from earlyexit_kernels.engine.layers import ort_layer

    if not GLIBC:
        pytest.skip("the periodic trim runs on glibc only")
    before = ort_layer._shrink_generation  # each ask moves it on
    trim = start_memory_trim(0.02)
    try:
        deadline = time.monotonic() + 10
        while trim.trims < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        trim.stop()
    asks = ort_layer._shrink_generation - before
    assert trim.trims >= 6
    assert trim.shrink_rule.shrinks == asks >= 1
    assert asks < trim.trims  # a test process's memory does not grow 2.5% every 20 ms
