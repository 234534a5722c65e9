"""Where a served process's resident memory goes over a soak (issue 64, item 3).

``eek serve`` on one core, one thread, driven at ``--concurrency`` with one text per request for
``--seconds`` after a 30 s warm-up, as the serving benchmark's soak runs it (``bench/serve_peers.py``).
Every ``--every`` seconds it reads the server's ``/proc/PID/smaps`` and splits the resident memory
into the main heap (``[heap]``, grown by ``brk``), the glibc arenas of other threads (anonymous
mappings in 64 MiB reservations: ``HEAP_MAX_SIZE``), other anonymous mappings (``mmap``'d
allocations, thread stacks) and files (libraries, weights), with the thread count beside them.
Each ``--setting`` is one server: a name, then ``eek serve`` options, then environment variables
after a ``|`` (``arenas 2:|MALLOC_ARENA_MAX=2``)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/serve_memory_profile.py FOLDER TEXTS.txt \\
        --setting "trim:" "trim, 2 arenas:|MALLOC_ARENA_MAX=2" --output benchmarks/results/amd_epyc/serve_memory_profile_cpu.json
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.serve_peers import default_cores, drive, pinned
from earlyexit_kernels.bench.results import cpu_name, instruction_sets
from earlyexit_kernels.bench.server_process import EekServer

ARENA = 64 * 1024  # KiB: glibc's HEAP_MAX_SIZE on 64-bit, the size a thread arena reserves


def memory_parts(pid: int) -> dict[str, float]:
    """The resident MiB of ``pid`` by kind of mapping, and its thread count."""
    parts = {"heap": 0, "arenas": 0, "anonymous": 0, "files": 0}
    arenas = 0
    size = 0
    kind = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size = (end - start) // 1024
            name = fields[5] if len(fields) > 5 else ""
            if name == "[heap]":
                kind = "heap"
            elif name.startswith("/"):
                kind = "files"
            elif name == "" and start % (ARENA * 1024) == 0 and size <= ARENA:
                kind = "arenas"  # an arena's heap starts at a 64 MiB boundary and never exceeds 64 MiB
            else:
                kind = "anonymous"
            arenas += kind == "arenas"
        elif fields[0] == "Rss:":
            parts[kind] += int(fields[1])
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    out = {k: round(v / 1024, 1) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / 1024, 1)
    out["arena_mappings"] = arenas
    out["threads"] = threads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--setting", nargs="+", default=["eek serve:"], help="NAME:EXTRA OPTIONS|ENV=VALUE ...")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--every", type=float, default=15.0)
    parser.add_argument("--output", type=Path, help="a JSON file the samples are written to")
    args = parser.parse_args()
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    server_cores, client_cores = default_cores()
    results = []
    for setting in args.setting:
        name, _, rest = setting.partition(":")
        extra, _, variables = rest.partition("|")
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.update(item.split("=", 1) for item in variables.split())
        server = EekServer(args.folder, None, 32, 1, extra=tuple(extra.split()), cores=server_cores, env=env, name=name)
        samples = []
        try:
            with pinned(client_cores):
                asyncio.run(drive(server.url, texts, list(range(len(texts))), args.concurrency, 30, cycle=True))
                began = time.perf_counter()

                def sample(server=server, began=began, samples=samples, name=name):
                    samples.append({"t": round(time.perf_counter() - began, 1), **memory_parts(server.pid)})
                    print(name, samples[-1], flush=True)

                sample()
                run = asyncio.run(
                    drive(
                        server.url,
                        texts,
                        list(range(len(texts))),
                        args.concurrency,
                        args.seconds,
                        cycle=True,
                        sample=sample,
                        every=args.every,
                    )
                )
                sample()
        finally:
            server.stop()
        first, last = samples[0]["total"], samples[-1]["total"]
        largest = max(abs(s["total"] - first) / first for s in samples)
        results.append(
            {
                "setting": name,
                "options": extra.split(),
                "env": variables.split(),
                "texts_per_s": round(len(run.index) / run.wall, 1),
                "errors": run.errors,
                "change_pct": round(100 * (last - first) / first, 1),
                "largest_deviation_pct": round(100 * largest, 1),
                "samples": samples,
            }
        )
        print(f"{name}: {results[-1]['texts_per_s']} texts/s, {first} -> {last} MiB", flush=True)
    if args.output:
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "instruction_sets": instruction_sets()}
        meta |= {"folder": str(args.folder), "concurrency": args.concurrency, "seconds": args.seconds}
        args.output.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
