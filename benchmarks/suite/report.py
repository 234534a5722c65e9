"""``python -m benchmarks.suite.report``: the results section of ``docs/benchmarks.md``, from committed CSVs.

    python -m benchmarks.suite.report                       # print the markdown
    python -m benchmarks.suite.report --readme docs/benchmarks.md    # replace the section in place

Reads ``benchmarks/results/<device>/*/bench.csv`` (or the CSVs given) and writes everything
between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` (appended at the end of the
file when the markers are missing). Nothing in that section is typed by hand: rerun
this script after a new sweep. With ``--readme`` it also rewrites the real-task exit-quality
section from ``benchmarks/results/intel_xeon/real_task_cpu.csv`` when that CSV exists and the file has the
section's markers
(:mod:`benchmarks.suite.real_task_quality`).

CSVs measured on the same machine (``device_name``) share one section: one Targets table
and the speed-up tables of every model, with the settings of each CSV stated (and its
command and duration, from the ``meta.json`` beside it); what a later CSV shares with the
first is said once. A model that ran with another attention than the CSV's ``--attn``
(DeBERTa-v3: eager only) is named with its attention in every table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict
from pathlib import Path

from benchmarks.suite import markdown_sections
from benchmarks.suite.command_names import current_command
from earlyexit_kernels.bench.results import read_csv

__all__ = ["render", "replace_section", "main"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
#: the CSV of ``python -m benchmarks.suite.real_task_quality``, whose section ``--readme`` also rewrites
REAL_TASK_CSV = "benchmarks/results/intel_xeon/real_task_cpu.csv"


def _f(value, fmt="{:.2f}"):
    return "" if value in (None, "") else fmt.format(float(value))


def _mib(value):
    return "" if value in (None, "") else f"{float(value) / 2**20:.1f}"


_BACKEND_ORDER = {"cuda": 0, "triton": 1, "cpp": 2, "torch": 3}
_STEP_ORDER = {"exact": 0, "graphed": 1}


def label_columns(rows: list[dict]) -> None:
    """Give each row its table column in ``_col``: ``eek (cpp)``, ``naive``, ``bs1``, a peer's name.

    An ``eek`` column names its step and policy too where the rows hold more than one of them
    (``eek (cuda, graphed, Entropy(0.3))``), a ``naive`` column its policy where there are several.
    """
    steps = {r.get("step", "") for r in rows if r["method"] == "eek"}
    policies = {r.get("policy", "") for r in rows if r["method"] in ("eek", "naive")}
    for r in rows:
        if r["method"] == "eek":
            parts = [r["backend"]]
            parts += [r["step"]] if len(steps) > 1 else []
            parts += [r["policy"]] if len(policies) > 1 else []
            r["_col"] = f"eek ({', '.join(parts)})"
        elif r["method"] == "naive":
            r["_col"] = f"naive ({r['policy']})" if len(policies) > 1 else "naive"
        elif r["method"] == "peer":
            r["_col"] = r["peer"] or r["backend"]
        else:
            r["_col"] = r["method"]


def _early_exit_columns(rows):
    """The ``eek`` columns: by backend, then step, then policy (``Scheduled`` first)."""
    eek = {r["_col"]: r for r in rows if r["method"] == "eek"}

    def order(r):
        return (
            _BACKEND_ORDER.get(r["backend"], 9),
            _STEP_ORDER.get(r.get("step", ""), 9),
            r.get("policy", "") != "Scheduled",
            r.get("policy", ""),
        )

    return sorted(eek, key=lambda col: order(eek[col]))


def _other_columns(rows, method: str) -> list[str]:
    columns = []
    for r in rows:
        if r["method"] == method and r["_col"] not in columns:
            columns.append(r["_col"])
    return columns


def _speedup_table(rows: list[dict], columns: list[str]) -> list[str]:
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(int(r["B"]), r["pattern"])][r["_col"]] = r
    naive = _other_columns(rows, "naive") or ["naive"]
    peers = _other_columns(rows, "peer")
    first = columns[0]
    head = ["B", "pattern", "f", "ideal L·B/Σexit", "shape-aware ideal"]
    head += columns + naive + ["bs1"] + peers + [f"{first} / shape ideal"]
    head += [f"{first} / strongest peer"] if peers else []
    head += [f"syncs/layer {first}", f"syncs/layer {naive[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    patterns = []
    for r in rows:
        if r["pattern"] not in patterns:
            patterns.append(r["pattern"])
    for (b, pattern), m in sorted(by_key.items(), key=lambda kv: (kv[0][0], patterns.index(kv[0][1]))):
        any_row = next(iter(m.values()))
        mine = m.get(first, {})
        cells = [str(b), pattern, _f(any_row["f_actual"]), _f(any_row["ideal_layers"]), _f(any_row["ideal_shape"])]
        cells += [_f(m.get(col, {}).get("speedup_vs_full")) for col in [*columns, *naive, "bs1", *peers]]
        cells += [_f(mine.get("ratio_ideal_shape"))]
        cells += [_f(mine.get("speedup_vs_peer"))] if peers else []
        cells += [_f(mine.get("syncs_per_layer")), _f(m.get(naive[0], {}).get("syncs_per_layer"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets_table(rows: list[dict], column: str, labels: dict | None = None) -> list[str]:
    """One line per (model, S, B) with the rows of the ``eek`` ``column``; ``labels[model]`` names the model."""
    labels = labels or {}
    order = _models_in_order(rows)
    lines = [
        "| model | S | B | overhead at f = 0 (p50) | added non-layer time at f = 0 | "
        "eek / shape ideal, f = 0.25 / 0.5 / 0.75 | eek / shape ideal, geometric / padded | "
        "peak memory eek / full at f = 0 (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = defaultdict(dict)
    for r in rows:
        if r["_col"] == column:
            groups[(r["model"], int(r["S"]), int(r["B"]))][r["pattern"]] = r
    fulls = {(r["model"], int(r["S"]), int(r["B"]), r["pattern"]): r for r in rows if r["method"] == "full"}
    for (model, s, b), pats in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1:])):
        f0 = pats.get("sched-f0.00")
        overhead = "" if f0 is None else f"{(1 / float(f0['speedup_vs_full']) - 1) * 100:+.1f}%"
        nonlayer = (
            ""
            if f0 is None or f0.get("nonlayer_overhead") in (None, "")
            else f"{float(f0['nonlayer_overhead']) * 100:+.2f}%"
        )
        # A pattern the run did not time (the spot rows time three) keeps its place as a dash.
        sched = " / ".join(
            _f(pats[p]["ratio_ideal_shape"]) if p in pats else "–"
            for p in ("sched-f0.25", "sched-f0.50", "sched-f0.75")
        )
        spread = " / ".join(
            next((_f(r["ratio_ideal_shape"]) for p, r in pats.items() if p.startswith(prefix)), "–")
            for prefix in ("geometric", "padded")
        )
        mem = ""
        if f0 is not None:
            full = fulls.get((model, s, b, "sched-f0.00"), {})
            mem = f"{_mib(f0.get('peak_mem_bytes'))} / {_mib(full.get('peak_mem_bytes'))}"
        lines.append(
            f"| {labels.get(model, model)} | {s} | {b} | {overhead} | {nonlayer} | {sched} | {spread} | {mem} |"
        )
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


def _models_in_order(rows: list[dict]) -> list[str]:
    """The models of ``rows``, ``bert`` first, then in the order they first appear."""
    order = []
    for r in rows:
        if r["model"] not in order:
            order.append(r["model"])
    return sorted(order, key=lambda m: m != "bert")


def _meta(path: Path) -> dict:
    """The ``meta.json`` written beside ``path`` by the suite ({} when there is none)."""
    try:
        return json.loads((Path(path).parent / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _attention(e2e: list[dict], meta: dict) -> tuple[str, dict]:
    """The run's ``--attn`` (meta.json, else the most common) and ``{model: attn}`` of the models that differ."""
    counts = defaultdict(int)
    for r in e2e:
        counts[r["attn"]] += 1
    main = meta.get("settings", {}).get("attn") or max(counts, key=counts.get)
    other = {}
    for r in e2e:
        if r["attn"] != main:
            other.setdefault(r["model"], r["attn"])
    return main, other


def _settings(e2e: list[dict], attention: str) -> list[list[tuple[str, str]]]:
    """How a CSV was measured: groups (written ``; ``-separated) of ``(key, text)`` pieces (``, ``-separated)."""
    first = e2e[0]
    return [
        [
            ("config", f"model size `{first['config']}` (random weights, 2 labels)"),
            ("dtype", first["dtype"]),
            ("attention", attention),
            ("threads", f"torch threads: {first['threads']}"),
            ("repeats", f"p50 of {first['repeats']} interleaved repetitions"),
        ],
        [
            (
                "versions",
                f"torch {first['torch']}, transformers {first['transformers']}, triton {first['triton'] or '-'}",
            )
        ],
    ]


def _source_lines(sources: list[tuple[Path, list[dict]]], relative_to: Path) -> list[str]:
    """How each CSV of one machine was measured; what a later one shares with the first is said once."""
    lines, reference = [], None
    for path, e2e in sources:
        meta = _meta(path)
        loads = sorted({r["load_1m"] for r in e2e}, key=float)
        main, other = _attention(e2e, meta)
        attention = f"attention `{main}`"
        if other:
            notes = "; ".join(f"`{m}`: `{a}` for every method, the full model included" for m, a in other.items())
            attention += f" ({notes})"
        groups = _settings(e2e, attention)
        if reference is None:
            reference = {key: text for group in groups for key, text in group}
            kept = [[text for _, text in group] for group in groups]
        else:
            kept = [[text for key, text in group if reference.get(key) != text] for group in groups]
            shared = "the other settings as above" if any(kept) else "the settings above"
            kept.append([shared])
        described = "; ".join(", ".join(group) for group in kept if group)
        loads_text = f"1-minute load average at each configuration's start: {loads[0]}-{loads[-1]}"
        text = f"easured {e2e[0]['timestamp']} (UTC); {described}; {loads_text}."
        if len(sources) > 1:
            text = f"`{os.path.relpath(path, relative_to)}` ({', '.join(_models_in_order(e2e))}): m{text}"
        else:
            text = f"M{text}"
        if meta.get("argv") is not None and "seconds" in meta:
            command = current_command(" ".join(["python -m earlyexit_kernels.bench", *meta["argv"]]))
            text += f" Written by `{command}` in {float(meta['seconds']):.0f} s."
        lines += [text, ""]
    return lines


def render(csv_paths: list[Path], relative_to: Path) -> str:
    out = [START, "## Results", ""]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    sources = ", ".join(f"`{os.path.relpath(p, relative_to)}`" for p in csv_paths)
    out += [
        f"Generated on {stamp} by `python -m benchmarks.suite.report` from {sources} "
        "(written by `eek bench sweep`); do not edit this section by hand. Speed-up = p50 time "
        "of the unpatched Hugging Face model / p50 time of the method, same process, weights, dtype and attention. "
        "`eek`: this package (`Scheduled` replays the pattern; the `policy` and `step` columns of the CSV say what ran); `naive`: eager exit step + boolean-index compaction "
        "(FastBERT/DeeBERT batched ports); `bs1`: one sequence at a time with a Python `if` (the research code). "
        "`sched-f<f>` saves the fraction f of the layer evaluations: every row exits after about layer (1 - f)·L "
        "(`sched-f0.50` on 12 layers: every row after layer 6); `geometric-p0.10`: 10% of the rows still running exit "
        "after each layer. Ideals and patterns: `earlyexit_kernels/bench/ideal.py`, `patterns.py`.",
    ]
    machines: dict[str, list[tuple[Path, list[dict]]]] = defaultdict(list)
    micro: dict[str, list[dict]] = defaultdict(list)
    for path in csv_paths:
        rows = read_csv(path)
        e2e = [r for r in rows if r["kind"] == "e2e" and r["t_p50_s"] != ""]  # a skipped row has no time
        if not e2e:
            continue
        machines[e2e[0]["device_name"]].append((Path(path), e2e))
        micro[e2e[0]["device_name"]] += [r for r in rows if r["kind"] != "e2e"]
    for device, sources in machines.items():
        e2e = []
        labels: dict[str, str] = {}
        seen = defaultdict(int)
        for _, rows in sources:
            for model in {r["model"] for r in rows}:
                seen[model] += 1
        for path, rows in sources:
            _, other = _attention(rows, _meta(path))
            folder = Path(path).parent.name
            for r in rows:
                label = r["model"]
                if r["model"] in other:
                    label += f" ({other[r['model']]} attention)"
                if seen[r["model"]] > 1:  # the same model in several CSVs: keep them apart
                    label += f" [{folder}]"
                labels[label] = label
                e2e.append({**r, "model": label})
        label_columns(e2e)
        columns = _early_exit_columns(e2e)
        out += ["", f"### {device}", ""]
        out += _source_lines(sources, relative_to)
        out += [
            f"Targets (`eek` with `{columns[0].removeprefix('eek (').removesuffix(')')}`): overhead at f = 0 (goal <= 2%; measured end to end, and as the "
            "time the engine adds around the layers, timed with every encoder layer replaced by an identity) and "
            "speed-up / shape-aware ideal (goal >= 0.95 at B = 32):",
            "",
        ]
        out += _targets_table(e2e, columns[0], labels)
        for model in _models_in_order(e2e):
            for s in sorted({int(r["S"]) for r in e2e if r["model"] == model}):
                sel = [r for r in e2e if r["model"] == model and int(r["S"]) == s]
                out += ["", f"Speed-up over the full model, {model}, S = {s}:", ""]
                out += _speedup_table(sel, columns)
        out += _micro_table(micro[device])
        for path, _ in sources:
            folder = os.path.relpath(Path(path).parent, relative_to)
            for name, alt in (
                ("speedup_vs_f.png", "speed-up vs f"),
                ("exit_step_vs_batch.png", "exit step vs batch size"),
            ):
                if (Path(path).parent / name).exists():
                    label = f"{alt}, {Path(path).parent.name}" if len(sources) > 1 else alt
                    out += ["", f"![{label}]({folder}/{name})"]
    out += ["", END]
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    return markdown_sections.replace_section(text, START, END, section)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite.report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="*", type=Path, help="default: benchmarks/results/<device>/*/bench.csv")
    parser.add_argument("--readme", type=Path, help="replace the results section of this file")
    args = parser.parse_args(argv)
    paths = args.csv or sorted(Path("benchmarks/results").glob("*/*/bench.csv"))
    if not paths:
        parser.error("no CSV found: run `eek bench sweep` first")
    base = args.readme.parent if args.readme else Path.cwd()
    section = render(paths, base)
    if args.readme:
        args.readme.write_text(replace_section(args.readme.read_text(), section))
        print(f"updated {args.readme}")
        from benchmarks.suite.real_task_quality import MARK_START, update_readme

        # the real-task exit quality has its own section (where the file has its markers), from its own CSV
        if Path(REAL_TASK_CSV).is_file() and MARK_START in args.readme.read_text():
            update_readme(str(args.readme), REAL_TASK_CSV)
            print(f"updated the real-task section of {args.readme} from {REAL_TASK_CSV}")
        from benchmarks.suite import stack_report

        # the stack table (bench --stack) has its own section too, where the file has its markers
        if Path(stack_report.STACK_CSV).is_file() and stack_report.START in args.readme.read_text():
            stack_report.update_readme(args.readme)
            print(f"updated the stack section of {args.readme} from {stack_report.STACK_CSV}")
    else:
        print(section, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
