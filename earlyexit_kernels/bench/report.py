"""``python -m earlyexit_kernels.bench.report``: the results section of ``docs/benchmarks.md``, from committed CSVs.

    python -m earlyexit_kernels.bench.report                       # print the markdown
    python -m earlyexit_kernels.bench.report --readme docs/benchmarks.md    # replace the section in place

Reads ``benchmarks/results/*/bench.csv`` (or the CSVs given) and writes everything
between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` (appended at the end of the
file when the markers are missing). Nothing in that section is typed by hand: rerun
this script after a new sweep.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections import defaultdict
from pathlib import Path

from earlyexit_kernels.bench.results import read_csv

__all__ = ["render", "replace_section", "main"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(value, fmt="{:.2f}"):
    return "" if value in (None, "") else fmt.format(float(value))


def _mib(value):
    return "" if value in (None, "") else f"{float(value) / 2**20:.1f}"


def _eek_backends(rows):
    order = {"cuda": 0, "triton": 1, "cpp": 2, "torch": 3}
    return sorted({r["backend"] for r in rows if r["method"] == "eek"}, key=lambda b: order.get(b, 9))


def _speedup_table(rows: list[dict], backends: list[str]) -> list[str]:
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(int(r["B"]), r["pattern"])][(r["method"], r["backend"])] = r
    head = ["B", "pattern", "f", "ideal L·B/Σexit", "shape-aware ideal"]
    head += [f"eek ({b})" for b in backends] + ["naive", "bs1", f"eek ({backends[0]}) / shape ideal"]
    head += [f"syncs/layer eek ({backends[0]})", "syncs/layer naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    patterns = []
    for r in rows:
        if r["pattern"] not in patterns:
            patterns.append(r["pattern"])
    for (b, pattern), m in sorted(by_key.items(), key=lambda kv: (kv[0][0], patterns.index(kv[0][1]))):
        any_row = next(iter(m.values()))
        first = m.get(("eek", backends[0]), {})
        cells = [str(b), pattern, _f(any_row["f_actual"]), _f(any_row["ideal_layers"]), _f(any_row["ideal_shape"])]
        cells += [_f(m.get(("eek", be), {}).get("speedup_vs_full")) for be in backends]
        cells += [
            _f(m.get(("naive", "torch"), {}).get("speedup_vs_full")),
            _f(m.get(("bs1", "torch"), {}).get("speedup_vs_full")),
        ]
        cells += [_f(first.get("ratio_ideal_shape")), _f(first.get("syncs_per_layer"))]
        cells += [_f(m.get(("naive", "torch"), {}).get("syncs_per_layer"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets_table(rows: list[dict], backend: str) -> list[str]:
    lines = [
        "| model | S | B | overhead at f = 0 (p50) | added non-layer time at f = 0 | "
        "eek / shape ideal, f = 0.25 / 0.5 / 0.75 | eek / shape ideal, geometric / padded | "
        "peak memory eek / full at f = 0 (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = defaultdict(dict)
    for r in rows:
        if r["method"] == "eek" and r["backend"] == backend:
            groups[(r["model"], int(r["S"]), int(r["B"]))][r["pattern"]] = r
    fulls = {(r["model"], int(r["S"]), int(r["B"]), r["pattern"]): r for r in rows if r["method"] == "full"}
    for (model, s, b), pats in sorted(groups.items(), key=lambda kv: (kv[0][0] != "bert", kv[0])):
        f0 = pats.get("sched-f0.00")
        overhead = "" if f0 is None else f"{(1 / float(f0['speedup_vs_full']) - 1) * 100:+.1f}%"
        nonlayer = (
            ""
            if f0 is None or f0.get("nonlayer_overhead") in (None, "")
            else f"{float(f0['nonlayer_overhead']) * 100:+.2f}%"
        )
        sched = " / ".join(
            _f(pats[p]["ratio_ideal_shape"]) for p in ("sched-f0.25", "sched-f0.50", "sched-f0.75") if p in pats
        )
        spread = " / ".join(
            _f(r["ratio_ideal_shape"]) for p, r in pats.items() if p.startswith(("geometric", "padded"))
        )
        mem = ""
        if f0 is not None:
            full = fulls.get((model, s, b, "sched-f0.00"), {})
            mem = f"{_mib(f0.get('peak_mem_bytes'))} / {_mib(full.get('peak_mem_bytes'))}"
        lines.append(f"| {model} | {s} | {b} | {overhead} | {nonlayer} | {sched} | {spread} | {mem} |")
    return lines


def _micro_table(rows: list[dict]) -> list[str]:
    impls = []
    for r in rows:
        if r["method"] not in impls:
            impls.append(r["method"])
    lines = []
    for kind, title in (
        ("exit_step", "Exit step (head + Entropy rule)"),
        ("compact", "Compaction (keep 1/2, trim 1/8)"),
    ):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        table = defaultdict(dict)
        for r in mine:
            table[int(r["B"])][r["method"]] = r
        lines += ["", f"{title}, µs per call (p50), S = {mine[0]['S']}:", ""]
        lines += ["| B | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for b in sorted(table):
            lines.append(
                f"| {b} | "
                + " | ".join(_f(float(table[b][i]["t_p50_s"]) * 1e6, "{:.1f}") if i in table[b] else "" for i in impls)
                + " |"
            )
    return lines


def render(csv_paths: list[Path], relative_to: Path) -> str:
    out = [START, "## Results", ""]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    sources = ", ".join(f"`{os.path.relpath(p, relative_to)}`" for p in csv_paths)
    out += [
        f"Generated on {stamp} by `python -m earlyexit_kernels.bench.report` from {sources} "
        "(written by `python -m earlyexit_kernels.bench`); do not edit this section by hand. Speed-up = p50 time "
        "of the unpatched Hugging Face model / p50 time of the method, same process, weights, dtype and attention. "
        "`eek`: this package (`Scheduled` exits); `naive`: eager exit step + boolean-index compaction "
        "(FastBERT/DeeBERT batched ports); `bs1`: one sequence at a time with a Python `if` (the research code). "
        "Ideals and patterns: `earlyexit_kernels/bench/ideal.py`, `patterns.py`.",
    ]
    for path in csv_paths:
        rows = read_csv(path)
        e2e = [r for r in rows if r["kind"] == "e2e"]
        if not e2e:
            continue
        meta = e2e[0]
        backends = _eek_backends(e2e)
        loads = sorted({r["load_1m"] for r in rows})
        out += [
            "",
            f"### {meta['device_name']}",
            "",
            f"Measured {meta['timestamp']} (UTC); model size `{meta['config']}` (random weights, 2 labels), "
            f"{meta['dtype']}, attention `{meta['attn']}`, torch threads: {meta['threads']}, p50 of {meta['repeats']} "
            f"interleaved repetitions; torch {meta['torch']}, transformers {meta['transformers']}, "
            f"triton {meta['triton'] or '-'}; 1-minute load average at each configuration's start: "
            f"{min(loads, key=float)}-{max(loads, key=float)}.",
            "",
            f"Targets (`eek` with `{backends[0]}`): overhead at f = 0 (goal <= 2%; measured end to end, and as the "
            "time the engine adds around the layers, timed with every encoder layer replaced by an identity) and "
            "speed-up / shape-aware ideal (goal >= 0.95 at B = 32):",
            "",
        ]
        out += _targets_table(e2e, backends[0])
        for model in sorted({r["model"] for r in e2e}, key=lambda m: m != "bert"):
            for s in sorted({int(r["S"]) for r in e2e if r["model"] == model}):
                sel = [r for r in e2e if r["model"] == model and int(r["S"]) == s]
                out += ["", f"Speed-up over the full model, {model}, S = {s}:", ""]
                out += _speedup_table(sel, backends)
        out += _micro_table([r for r in rows if r["kind"] != "e2e"])
        folder = os.path.relpath(Path(path).parent, relative_to)
        for name, alt in (("speedup_vs_f.png", "speed-up vs f"), ("exit_step_vs_batch.png", "exit step vs batch size")):
            if (Path(path).parent / name).exists():
                out += ["", f"![{alt}]({folder}/{name})"]
    out += ["", END]
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + section.rstrip("\n") + tail
    return text.rstrip("\n") + "\n\n" + section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m earlyexit_kernels.bench.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("csv", nargs="*", type=Path, help="default: benchmarks/results/*/bench.csv")
    parser.add_argument("--readme", type=Path, help="replace the results section of this file")
    args = parser.parse_args(argv)
    paths = args.csv or sorted(Path("benchmarks/results").glob("*/bench.csv"))
    if not paths:
        parser.error("no CSV found: run `python -m earlyexit_kernels.bench` first")
    base = args.readme.parent if args.readme else Path.cwd()
    section = render(paths, base)
    if args.readme:
        args.readme.write_text(replace_section(args.readme.read_text(), section))
        print(f"updated {args.readme}")
    else:
        print(section, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
