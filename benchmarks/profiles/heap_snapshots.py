"""``eek`` run with a heap recorder beside it: what a served process keeps, a snapshot every few seconds.

    python benchmarks/profiles/heap_snapshots.py --every 60 --output heap.jsonl [--tracemalloc] -- \\
        serve FOLDER --port 8080 ...

``python benchmarks/profiles/heap_snapshots.py --summary FILE.jsonl ...`` prints a recorded file as
a table. Everything after ``--`` is ``eek``'s command line, run in this process (the same code as
``python -m earlyexit_kernels``). Every ``--every`` seconds a daemon thread appends one JSON line
to ``--output``:

- ``resident_mib`` (``VmRSS``) and glibc's own account (``mallinfo2``: the heap's bytes in use,
  its free bytes, the blocks mapped on their own), so memory the process holds is told apart from
  memory its allocator keeps;
- the Python objects alive by type, and the largest containers (their length and what they hold),
  so a structure that grows with traffic shows as a count that climbs;
- the tensors alive (count, MiB of their storages);
- with ``--tracemalloc``, the Python allocations grown by line of source, since the first snapshot
  and since the last one (slower: every Python allocation is traced).

:mod:`benchmarks.profiles.serve_memory_profile` starts servers through it (``--heap``) and
summarizes the lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

from earlyexit_kernels.integrations.server.memory_trim import heap_account, resident_bytes  # noqa: E402

MIB = 1024 * 1024
#: containers shorter than this are not listed among the largest
LONG = 256


def _what(container) -> str:
    """A short description of what a container holds: its type and the type of one item."""
    kind = type(container).__name__
    if type(container) not in (dict, list, set, tuple):  # a subclass may load something when read (lazy mappings)
        return kind
    try:
        if isinstance(container, dict):
            key, value = next(iter(container.items()))
            return f"{kind}[{type(key).__name__}, {type(value).__name__}]"
        return f"{kind}[{type(next(iter(container))).__name__}]"
    except Exception:  # noqa: BLE001 -- emptied by another thread meanwhile, or a mapping that loads on access
        return kind


def _length(container) -> int:
    try:
        return len(container)
    except Exception:  # noqa: BLE001 -- a container subclass whose len loads something
        return 0


def snapshot(began: float, traced: list[tracemalloc.Snapshot] | None, top: int = 15) -> dict:
    """One reading of this process (see the module docstring). ``traced``: the tracemalloc snapshots
    so far (the first reading's and the last), to which this reading's is compared and added."""
    import torch

    line: dict = {"t": round(time.perf_counter() - began, 1), "resident_mib": round((resident_bytes() or 0) / MIB, 1)}
    heap = heap_account()
    if heap is not None:
        line["heap_mib"] = {k: round(v / MIB, 1) if k != "mapped_blocks" else v for k, v in heap.items()}
    objects = gc.get_objects()
    line["objects"] = len(objects)
    counts = Counter(type(o).__name__ for o in objects)
    line["types"] = dict(counts.most_common(40))
    # by type(), not isinstance: isinstance reads __class__, which a weak proxy whose object has died raises
    # ReferenceError on (gc lists such proxies), and some deprecated objects warn on
    long = [o for o in objects if issubclass(type(o), dict | list | set | tuple) and _length(o) >= LONG]
    tensors = [o for o in objects if issubclass(type(o), torch.Tensor)]
    long.sort(key=_length, reverse=True)
    line["largest_containers"] = [[_length(o), _what(o)] for o in long[:top]]
    storages = {}
    for tensor in tensors:
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse)
            pass
    line["tensors"] = len(tensors)
    line["tensor_mib"] = round(sum(storages.values()) / MIB, 1)
    del objects, long, tensors
    if traced is not None:
        now = tracemalloc.take_snapshot()
        line["traced_mib"] = round(sum(s.size for s in now.statistics("filename")) / MIB, 1)
        # KiB and blocks grown by line of source: since the first reading, and since the last one
        for name, then in (("grown_since_first_kib", traced[:1]), ("grown_since_last_kib", traced[-1:])):
            if then:
                line[name] = [
                    [str(stat.traceback[0]), round(stat.size_diff / 1024, 1), stat.count_diff]
                    for stat in now.compare_to(then[0], "lineno")[:top]
                ]
        traced[:] = [(traced or [now])[0], now]
    return line


def record(output: Path, every: float, traced: bool, stop: threading.Event) -> None:
    """Append a snapshot to ``output`` every ``every`` seconds until ``stop`` is set (and one then)."""
    began = time.perf_counter()
    snapshots: list | None = [] if traced else None
    with open(output, "a") as handle:
        while True:
            stopping = stop.wait(every)
            handle.write(json.dumps(snapshot(began, snapshots)) + "\n")
            handle.flush()
            if stopping:
                return


def summary(path: Path) -> str:
    """A Markdown table of a recorded file's snapshots: what the process held at each."""
    lines = [
        "| s | resident MiB | glibc: in use / free / mapped MiB | Python objects | tensors (MiB) | largest containers |",
        "| ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for text in path.read_text().splitlines():
        snap = json.loads(text)
        heap = snap.get("heap_mib") or {}
        glibc = " / ".join(str(heap.get(k, "-")) for k in ("in_use", "free", "mapped"))
        largest = ", ".join(f"{n:,} {what}" for n, what in snap["largest_containers"][:3])
        lines.append(
            f"| {snap['t']:.0f} | {snap['resident_mib']} | {glibc} | {snap['objects']:,} | "
            f"{snap['tensors']} ({snap['tensor_mib']}) | {largest} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summary"]:
        for path in argv[1:]:
            print(f"{path}:\n\n{summary(Path(path))}")
        return
    at = argv.index("--") if "--" in argv else len(argv)
    ours, command = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=60.0, help="seconds between two snapshots")
    parser.add_argument("--output", type=Path, required=True, help="a JSON-lines file, appended to")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python's allocations (slower)")
    args = parser.parse_args(ours)
    if not command:
        parser.error("give eek's command line after --, e.g. -- serve FOLDER")
    if args.tracemalloc:
        tracemalloc.start(1)
    stop = threading.Event()
    thread = threading.Thread(target=record, args=(args.output, args.every, args.tracemalloc, stop), daemon=True)
    thread.start()
    from earlyexit_kernels.__main__ import main as eek

    try:
        eek(command)
    finally:
        stop.set()
        thread.join(timeout=60)


if __name__ == "__main__":
    main()
