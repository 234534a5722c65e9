"""Resident memory held down under load: the allocator's free memory handed back every few seconds.

    trim = start_memory_trim(10.0)   # what eek serve does at start-up; trim.line says what it chose
    ...
    trim.stop()

Under a steady load the server's resident memory grows with glibc's allocator (+39.6% over a
300 s soak at concurrency 32, docs/serving.md): freed tensors go back to the allocator's arenas,
not to the system, and glibc's adaptive mmap threshold moves the large ones from ``mmap`` into
those arenas after the first few are freed. The ways out measured are in docs/serving.md
("Resident memory under load"); the default costs no texts/s:

- ``"trim"``: ``malloc_trim(0)`` (glibc, through ctypes) from a daemon thread every ``interval``
  seconds: the free pages of every arena are returned (``madvise``), whatever their place in
  the heap; the allocator's behaviour between two trims is untouched;
- where the process already runs on a maintained allocator (jemalloc, mimalloc or tcmalloc
  preloaded, ``LD_PRELOAD``), nothing is done: each returns memory itself;
- where the C library is not glibc (musl, macOS), nothing can be done from here; the line says so.

``interval`` 0 (``eek serve --memory-trim off``) turns it off.

What still grows is free memory, not memory the server holds (``benchmarks/profiles/engine_memory_profile.py``,
glibc's ``mallinfo2``): under a steady load the bytes in use stay flat while the heap's free
bytes grow, and the allocator touches them again within seconds of a trim. Blocks between 128 KiB
and a few MiB (a layer call's activations) spread the heap once glibc's adaptive threshold keeps
them there. ``flat=True`` (``eek serve --memory-flat``) fixes the threshold at 128 KiB, so those
blocks are mapped on their own and returned when freed: resident memory flat (+2.8% over a 300 s
soak), at a quarter fewer texts/s (page faults on every such block). The default keeps the texts/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MemoryTrim",
    "start_memory_trim",
    "trim_once_per_process",
    "process_trim_line",
    "preloaded_allocator",
    "heap_account",
    "resident_bytes",
    "DEFAULT_INTERVAL",
    "SHRINK_GROWTH",
    "ArenaShrinkRule",
]

#: seconds between two trims by default (``eek serve --memory-trim``)
DEFAULT_INTERVAL = 10.0
#: ONNX Runtime's arena is shrunk once resident memory has grown by more than this share since the reading after
#: the last shrink: half the 5% a server's memory may move (issue 79), so that a shrink, which the calls after it
#: pay for by extending the arena again, comes only where memory grew (:class:`ArenaShrinkRule`)
SHRINK_GROWTH = 0.025
#: ``flat``: blocks of this many bytes or more are mapped on their own (glibc's default threshold, fixed)
FLAT_MMAP_THRESHOLD = 128 * 1024
#: ``flat``: free() never trims the heap's top itself; the periodic trim does
FLAT_TRIM_THRESHOLD = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
#: the maintained allocators that return memory themselves, by the name of their shared library
ALLOCATORS = ("jemalloc", "mimalloc", "tcmalloc")


def preloaded_allocator(maps: str | None = None) -> str | None:
    """The maintained allocator this process runs on (a name of :data:`ALLOCATORS`), from its memory map."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        library = line.rsplit("/", 1)[-1]
        for name in ALLOCATORS:
            if library.startswith(f"lib{name}"):
                return name
    return None


def _glibc():
    """glibc as a ctypes library, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _fix_mmap_threshold() -> bool:
    """``flat``: glibc's mmap threshold fixed at :data:`FLAT_MMAP_THRESHOLD` (whether glibc took it)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, FLAT_MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, FLAT_TRIM_THRESHOLD)
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def heap_account() -> dict[str, int] | None:
    """glibc's own account of this process's heap (``mallinfo2``, glibc >= 2.33), in bytes: ``heap`` (the
    arenas' size), ``in_use``, ``free`` (held by the allocator), ``mapped`` (blocks mapped on their own)
    and ``mapped_blocks``; None where the C library has no ``mallinfo2``."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {
        "heap": info.arena,
        "in_use": info.uordblks,
        "free": info.fordblks,
        "mapped": info.hblkhd,
        "mapped_blocks": info.hblks,
    }


def resident_bytes() -> int | None:
    """This process's resident memory (``VmRSS``) in bytes; None where ``/proc`` does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ArenaShrinkRule:
    """When the memory trim asks ONNX Runtime's arena to shrink (``ort_layer.request_arena_shrink``): at its first
    reading, then whenever resident memory (read after glibc's trim) has grown by more than ``growth`` since the
    reading that followed the last shrink. A shrink every interval held memory within 5% too, but each one makes
    the layer calls after it extend the arena again; under a steady load the arena's size settles and this rule
    stops asking."""

    growth: float = SHRINK_GROWTH
    floor: int | None = None  # resident bytes read after the last shrink
    asked: bool = False  # a shrink was asked at the last reading: this one is its floor
    shrinks: int = 0

    def should_shrink(self, resident: int | None) -> bool:
        """Whether to ask for a shrink, given this reading of resident memory (None: unknown, always shrink)."""
        if self.asked and resident is not None:
            self.floor, self.asked = resident, False
            return False
        if resident is None or self.floor is None or resident > self.floor * (1 + self.growth):
            self.asked = True
            self.shrinks += 1
            return True
        return False


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


@dataclass
class MemoryTrim:
    """The running trim (or the reason there is none): ``line`` is what the server logs at start-up."""

    line: str
    interval: float = 0.0
    trims: int = 0
    shrink_rule: ArenaShrinkRule = field(default_factory=ArenaShrinkRule)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def start_memory_trim(interval: float = DEFAULT_INTERVAL, *, flat: bool = False, maps: str | None = None) -> MemoryTrim:
    """Start trimming every ``interval`` seconds where it helps; 0 leaves the allocator as it is.
    ``flat``: also fix glibc's mmap threshold (the module docstring), before the model's tensors
    are allocated; it needs the trim."""
    if interval < 0:
        raise ValueError(f"the memory trim interval must be >= 0 seconds (0: off); got {interval}")
    if interval == 0:
        if flat:
            raise ValueError("flat memory needs the periodic trim: give a trim interval (--memory-trim SECONDS)")
        return MemoryTrim("memory: the allocator left as it is (--memory-trim off)")
    allocator = preloaded_allocator(maps)
    if allocator is not None:
        return MemoryTrim(f"memory: {allocator} is preloaded and returns memory itself; no trim needed")
    trim = _glibc_malloc_trim()
    if trim is None:
        return MemoryTrim("memory: the C library is not glibc; resident memory is left to its allocator")
    line = (
        f"memory: glibc's free memory returned every {interval:g} s (malloc_trim), and ONNX Runtime's arena "
        f"shrunk at the next layer call where resident memory grew by more than {SHRINK_GROWTH:.1%} since the "
        f"last shrink (--memory-trim off to turn both off)"
    )
    if flat and _fix_mmap_threshold():
        line += f"; blocks of {FLAT_MMAP_THRESHOLD // 1024} KiB or more mapped on their own (--memory-flat)"
    state = MemoryTrim(line, interval)

    def loop() -> None:
        from earlyexit_kernels.engine.layers.ort_layer import request_arena_shrink

        rule = state.shrink_rule
        while not state._stop.wait(interval):
            trim(0)
            state.trims += 1
            if rule.should_shrink(resident_bytes()):
                request_arena_shrink()  # ONNX Runtime's layers: their arena's free regions, at their next call

    state._thread = threading.Thread(target=loop, name="eek-memory-trim", daemon=True)
    state._thread.start()
    return state


_process_trim: MemoryTrim | None = None
_process_lock = threading.Lock()


def trim_once_per_process(interval: float = DEFAULT_INTERVAL, *, flat: bool = False) -> MemoryTrim:
    """:func:`start_memory_trim` the first time a process calls it; the same trim after that (a Ray
    replica may build its app more than once, and one trim thread a process is enough)."""
    global _process_trim
    with _process_lock:
        if _process_trim is None:
            _process_trim = start_memory_trim(interval, flat=flat)
            print(_process_trim.line, file=sys.stderr, flush=True)
        return _process_trim


def process_trim_line() -> str | None:
    """What this process's trim does (its start-up line, without ``memory: ``), or None where it started
    none (an app built from Python, outside ``eek serve`` and Ray replicas)."""
    trim = _process_trim
    return None if trim is None else trim.line.removeprefix("memory: ")
