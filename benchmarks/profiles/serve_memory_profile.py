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
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

from benchmarks.suite.markdown_sections import replace_section
from benchmarks.suite.serve_drive import default_cores, drive, pinned
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


def heap_in_use(url: str) -> dict[str, float]:
    """The server's own account of its heap (``/metrics``: glibc's bytes in use and free), in MiB."""
    import httpx

    names = {"eek_heap_in_use_bytes": "in_use", "eek_heap_free_bytes": "free"}
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = round(float(value) / 1024 / 1024, 1)
    return out


def _file_name(setting: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in setting).strip("-") or "server"


def server_setting(setting: str, wrapper: Path | None = None) -> tuple[str, list[str], dict[str, str], list[str]]:
    """``NAME:EXTRA OPTIONS|ENV=VALUE ...`` as (name, the extra ``eek serve`` options, its environment on one
    thread, the command that runs ``eek``: ``wrapper`` given, that script with ``eek``'s command line after ``--``)."""
    name, _, rest = setting.partition(":")
    extra, _, variables = rest.partition("|")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(item.split("=", 1) for item in variables.split())
    launcher = [sys.executable, "-m", "earlyexit_kernels"]
    if wrapper is not None:
        launcher = [sys.executable, str(wrapper), "--"]
    return name, extra.split(), env, launcher


def soak(args, texts: list[str], setting: str, server_cores, client_cores) -> dict:
    """One ``setting``'s server over a soak: its readings, texts/s and the change of resident memory."""
    name, extra, env, launcher = server_setting(setting, args.wrapper)
    if args.heap is not None:
        args.heap.mkdir(parents=True, exist_ok=True)
        snapshots = args.heap / f"{_file_name(name)}.jsonl"
        snapshots.unlink(missing_ok=True)
        launcher = [sys.executable, str(Path(__file__).with_name("heap_snapshots.py"))]
        launcher += ["--every", str(args.heap_every), "--output", str(snapshots)]
        launcher += ["--tracemalloc"] * args.tracemalloc + ["--"]
    server = EekServer(
        args.folder, None, 32, 1, extra=tuple(extra), cores=server_cores, env=env, name=name, launcher=launcher
    )
    samples = []
    indices = list(range(len(texts)))
    try:
        with pinned(client_cores):
            asyncio.run(drive(server.url, texts, indices, args.concurrency, args.warmup, cycle=True))
            began = time.perf_counter()

            def sample():
                reading = {"t": round(time.perf_counter() - began, 1), **memory_parts(server.pid)}
                samples.append(reading | heap_in_use(server.url))
                print(name, samples[-1], flush=True)

            sample()
            load = drive(
                server.url, texts, indices, args.concurrency, args.seconds, cycle=True, sample=sample, every=args.every
            )
            run = asyncio.run(load)
            sample()
    finally:
        server.stop()
    first, last = samples[0]["total"], samples[-1]["total"]
    largest = max(abs(s["total"] - first) / first for s in samples)
    result = {
        "setting": name,
        "options": extra,
        "env": setting.partition("|")[2].split(),
        "texts_per_s": round(len(run.index) / run.wall, 1),
        "errors": run.errors,
        "change_pct": round(100 * (last - first) / first, 1),
        "largest_deviation_pct": round(100 * largest, 1),
        "samples": samples,
    }
    print(f"{name}: {result['texts_per_s']} texts/s, {first} -> {last} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("texts", type=Path, nargs="?", help="one text per line")
    parser.add_argument("--setting", nargs="+", default=["eek serve:"], help="NAME:EXTRA OPTIONS|ENV=VALUE ...")
    parser.add_argument("--label", default="", help="what is served (the rendered table's first column)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the settings, in alternating order")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between two readings")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the first reading")
    parser.add_argument("--output", type=Path, help="a JSON file the samples are written to")
    parser.add_argument(
        "--heap",
        type=Path,
        help="a folder: each server runs under heap_snapshots.py, which writes SETTING.jsonl there",
    )
    parser.add_argument("--heap-every", type=float, default=60.0, help="--heap: seconds between two snapshots")
    parser.add_argument("--tracemalloc", action="store_true", help="--heap: trace Python's allocations too")
    parser.add_argument("--wrapper", type=Path, help="a Python script that runs eek's command line given after --")
    parser.add_argument("--render", type=Path, nargs="+", help="recorded JSON files: print their table, run nothing")
    parser.add_argument("--readme", type=Path, help="--render: write the table into this Markdown file's section")
    args = parser.parse_args()
    if args.render:
        section = render([json.loads(path.read_text()) for path in args.render])
        if args.readme is None:
            print(section)
        else:
            text = replace_section(args.readme.read_text(), START, END, section, heading="Resident memory soaks")
            args.readme.write_text(text)
        return
    if args.folder is None or args.texts is None:
        parser.error("give FOLDER and TEXTS (or --render JSON files)")
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    server_cores, client_cores = default_cores()
    results = []
    for round_ in range(args.rounds):
        for setting in args.setting if round_ % 2 == 0 else args.setting[::-1]:
            results.append({"round": round_ + 1} | soak(args, texts, setting, server_cores, client_cores))
    if args.output:
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "instruction_sets": instruction_sets()}
        meta |= {"folder": str(args.folder), "label": args.label, "concurrency": args.concurrency}
        meta |= {"seconds": args.seconds, "every": args.every, "warmup": args.warmup, "command": sys.argv[1:]}
        args.output.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")


START, END = "<!-- memory-soak:start -->", "<!-- memory-soak:end -->"


def render(records: list[dict]) -> str:
    """The soaks' table: per served model and setting, resident memory over the soak and texts/s
    (median and range over the rounds), with glibc's bytes in use beside it."""
    lines = [START, ""]
    cpus = sorted({record["cpu"] for record in records})
    dates = sorted({record["date"] for record in records})
    lines.append(
        f"{', '.join(cpus)}, {', '.join(dates)}; each soak at concurrency {records[0]['concurrency']} for the seconds "
        "given after a warm-up, resident memory (VmRSS) read every 10 s; texts/s and the change are medians over the "
        'rounds, run in alternating order (range in brackets); "heap in use": glibc\'s own account (mallinfo2) at the '
        "first and last reading."
    )
    lines += [
        "",
        "| model | setting | soak | rounds | texts/s | resident memory (MiB) | change | largest deviation | heap in use (MiB) |",
    ]
    lines.append("| --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- |")
    for record in records:
        by_setting: dict[str, list[dict]] = {}
        for result in record["results"]:
            by_setting.setdefault(result["setting"], []).append(result)
        for setting, runs in by_setting.items():
            rates = sorted(r["texts_per_s"] for r in runs)
            changes = sorted(r["change_pct"] for r in runs)
            largest = max(r["largest_deviation_pct"] for r in runs)
            middle = runs[[r["change_pct"] for r in runs].index(statistics.median_low(changes))]
            first, last = middle["samples"][0], middle["samples"][-1]
            spread = lambda values: "" if len(values) < 2 else f" [{values[0]:g} to {values[-1]:g}]"  # noqa: E731
            in_use = f"{first.get('in_use', '?')} to {last.get('in_use', '?')}"
            lines.append(
                f"| {record.get('label') or record['folder']} | {setting} | "
                f"{record['seconds']:g} s after {record.get('warmup', 30):g} s | {len(runs)} | "
                f"{statistics.median(rates):.1f}{spread(rates)} | {first['total']:.0f} to {last['total']:.0f} | "
                f"{statistics.median(changes):+.1f}%{spread(changes)} | {largest:.1f}% | {in_use} |"
            )
    lines.append("")
    for record in records:
        if record.get("command"):
            shown = shlex.join(record["command"])
            lines.append(
                f"- {record.get('label') or record['folder']}: `python benchmarks/profiles/serve_memory_profile.py {shown}`"
            )
    lines += ["", END]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
