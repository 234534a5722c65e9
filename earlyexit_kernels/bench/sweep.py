"""``eek bench sweep``: the end-to-end sweep, the microbenchmarks, the CSV and the plots.

    eek bench sweep                                 # defaults for the device (see --help) -> bench-results/<device>-<time>/
    eek bench sweep --smoke --output-dir /tmp/b     # seconds: checks the suite runs
    eek bench sweep --models bert --spot-models none --batch-sizes 64 --seq-lens 128 \
        --patterns sched-f0.00,geometric-p0.10 --policies scheduled,entropy --step exact,graphed --no-baselines

Writes ``<output-dir>/bench.csv`` (schema: :mod:`.results`), ``meta.json`` (command,
duration, load, the timing controls and the GPU's clocks before and after, the captured peers' SDPA
calls, the unpatched models' p20/p50/p80; rewritten after each configuration) and the plots
(:mod:`.plots`). In the repository, ``python -m benchmarks.suite.report``
turns the committed CSVs into the results section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from earlyexit_kernels.bench.models import ARCHITECTURES, SIZES, build_model, pad_token_id
from earlyexit_kernels.bench.patterns import (
    check_pattern_name,
    geometric,
    pattern_by_name,
    scheduled,
    standard_patterns,
)
from earlyexit_kernels.bench.peers import PEERS, PeerModels, check_peer_names, unavailable
from earlyexit_kernels.bench.plots import make_plots
from earlyexit_kernels.bench.results import append_csv, environment, write_csv
from earlyexit_kernels.bench.runner import POLICIES, MeasureSettings, measure_pattern
from earlyexit_kernels.bench.timing_controls import gc_paused, timing_controls
from earlyexit_kernels.engine.graphed.buckets import sizes_from_file
from earlyexit_kernels.engine.step.step_choice import STEP_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    """Comma-separated architectures; ``none`` (or nothing) for none."""
    if text.strip().lower() in ("", "none"):
        return []
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in ARCHITECTURES:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {', '.join(ARCHITECTURES)}")
    return names


def _choices(choices, what: str):
    """A parser of a comma list of ``choices`` (each once, in the order given)."""

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
        if not names:
            raise argparse.ArgumentTypeError(f"name at least one {what}: {', '.join(choices)}")
        return names

    return parse


def _patterns(text: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    try:
        return [check_pattern_name(name) for name in names]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _peers(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return check_peer_names([v.strip() for v in text.split(",") if v.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _lags(text: str) -> list[int | None]:
    """Comma-separated lags: ``device`` (None: the device's default) or integers >= 0."""
    lags: list[int | None] = []
    for value in (v.strip() for v in text.split(",") if v.strip()):
        if value == "device":
            lags.append(None)
        elif value.isdigit():
            lags.append(int(value))
        else:
            raise argparse.ArgumentTypeError(f"a lag is an integer >= 0 or device; got {value!r}")
    if not lags:
        raise argparse.ArgumentTypeError("give at least one lag")
    return list(dict.fromkeys(lags))


def _backends(text: str) -> list[str]:
    from earlyexit_kernels.backends.registry import BACKEND_NAMES

    return _choices(("auto", *BACKEND_NAMES), "backend")(text)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="eek bench sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--size", choices=sorted(SIZES), help="model size preset (models.py); default: base on CUDA, small on CPU"
    )
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 64, 128])
    parser.add_argument("--seq-lens", type=_ints, default=[128, 512])
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="the shortest sequence length runs every batch size; longer ones only while B*S <= this "
        "(default: no limit on CUDA, 4096 on CPU)",
    )
    parser.add_argument(
        "--models", type=_names, default=["bert"], help="architectures of the full sweep (none: no sweep)"
    )
    parser.add_argument(
        "--spot-models",
        type=_names,
        default=["albert", "roberta", "distilbert", "deberta_v3", "modernbert"],
        help="spot checks: 3 patterns at --spot-batch (none: no spot checks)",
    )
    parser.add_argument("--spot-batch", type=int, default=32)
    parser.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="attention of every method; deberta_v3 always runs eager (the CSV's attn column says so)",
    )
    parser.add_argument(
        "--patterns",
        type=_patterns,
        help="exit patterns, comma-separated (sched-f<f>, geometric-p<p>, padded-geometric; patterns.py); default: "
        "sched-f0.00,sched-f0.25,sched-f0.50,sched-f0.75,geometric-p0.10,padded-geometric for the sweep and "
        "sched-f0.00,sched-f0.50,geometric-p0.10 for the spot checks; given, both run these",
    )
    parser.add_argument(
        "--policies",
        type=_choices(POLICIES, "policy"),
        default=["scheduled"],
        help="comma-separated: scheduled (the pattern replayed, Scheduled) and/or entropy (an Entropy policy whose "
        "exit heads are set so that the rows exit on the pattern: the head and the decision at every layer, "
        "threshold_pattern.py) [scheduled]",
    )
    parser.add_argument(
        "--step",
        type=_choices(STEP_NAMES, "step"),
        default=["auto"],
        help="eek.patch(..., step=) of the eek rows, comma-separated to time several interleaved: exact, graphed, "
        "auto (graphed on CUDA, exact elsewhere); steps that resolve alike run once [auto]",
    )
    parser.add_argument(
        "--graphed-lags",
        type=_lags,
        default=[None],
        help="the graphed step's lag (layers a device-side survivor count waits before the host reads it), "
        "comma-separated to time several interleaved: a number, or device (its default: 1 on CUDA, 0 elsewhere); "
        "a lag other than the device's gives rows whose step reads graphed-lag<N> [device]",
    )
    parser.add_argument(
        "--bucket-table",
        type=Path,
        default=None,
        help="a layer-cost table (benchmarks/micro/layer_cost_table.py's layer_costs.json): also time the graphed "
        "step, prologue captured, in the bucket sizes it chooses: rows whose step reads graphed-prologue-buckets",
    )
    parser.add_argument(
        "--graphed-torch-heads",
        action="store_true",
        help="also time the graphed step, prologue captured, with the exit heads as the model's modules (cuBLAS's "
        "GEMMs on a GPU) before the backend's rule, instead of its fused head: rows whose step reads "
        "graphed-prologue-torchheads",
    )
    parser.add_argument(
        "--graphed-prologue",
        action="store_true",
        help="also time the graphed step with its prologue (the inputs' summary and the embeddings) captured "
        "in a CUDA graph too, at the device's lag: rows whose step reads graphed-prologue",
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        help="eek backends, comma-separated (those that cannot run on the device are left out); default: every "
        "compiled backend of the device, then torch",
    )
    parser.add_argument(
        "--peers",
        type=_peers,
        help=f"unpatched peers beside the eager model, comma-separated: {', '.join(PEERS)} (compile, graphs and "
        "fast-attn for short), or none; the ratios are also taken against the fastest unpatched model. Default: "
        "cuda-graphs,cuda-graphs-fast-attn on CUDA (the compiled peer compiles once per shape: asked for by name), "
        "none elsewhere (asked for without CUDA, each gives a row saying it was skipped and why)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="leave out the naive and bs1 baselines (bs1 is slow at large B)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (p20/p50/p80 over them)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    parser.add_argument(
        "--no-micro",
        action="store_true",
        help="ignored: the exit-step and compaction microbenchmarks moved to the repository's benchmarks/suite/micro.py "
        "(the flag goes in the next release)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, B in {1, 4}, S = 16, one repetition, 1 thread"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="default: a new folder bench-results/<device type>-<UTC time> under the current folder "
        "(the repository's committed results are in benchmarks/results/<device folder>, results.device_folder)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's own choice; 1 with --timing-controls)"
    )
    parser.add_argument(
        "--timing-controls",
        action=argparse.BooleanOptionalAction,
        help="hold the host still while timing (timing_controls.py): the main thread pinned to one CPU, torch on one "
        "thread (unless --threads says otherwise), no garbage collection inside a configuration (a collection before "
        "each), nvidia-smi's clocks, clock-event reasons, temperature and power read before and after, into "
        "meta.json. Default: on with CUDA, off elsewhere",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--append-csv",
        type=Path,
        help="also append each configuration's rows to this CSV as soon as it is measured (header once), so a run "
        "killed part-way keeps what it measured; several runs may share one file",
    )
    args = parser.parse_args(argv)
    args.argv = argv
    device = torch.device(args.device)
    if args.smoke:
        args.size, args.batch_sizes, args.seq_lens, args.repeats, args.spot_batch = "tiny", [1, 4], [16], 1, 4
        # One thread: two OpenMP threads on a busy 2-core machine make tiny ops ~25x slower.
        args.threads = args.threads or 1
    args.size = args.size or ("base" if device.type == "cuda" else "small")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.max_tokens is None and device.type != "cuda" and not args.smoke:
        args.max_tokens = 4096
    args.output_dir = args.output_dir or _fresh_folder(Path("bench-results"), device.type)
    if args.peers is None:
        args.peers = ["cuda-graphs", "cuda-graphs-fast-attn"] if device.type == "cuda" else []
    if args.timing_controls is None:
        args.timing_controls = device.type == "cuda"
    return args


def _fresh_folder(parent: Path, name: str) -> Path:
    """``parent/<name>-<UTC time>``, with a suffix if that exists already: never an earlier run's folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate, n = parent / f"{name}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{stamp}-{n}"
    return candidate


def _grid(args) -> list[tuple[int, int]]:
    shortest = min(args.seq_lens)
    return [
        (s, b)
        for s in args.seq_lens
        for b in args.batch_sizes
        if s == shortest or args.max_tokens is None or b * s <= args.max_tokens
    ]


def fast_backends(device: torch.device) -> list[str]:
    """The compiled backends that run on ``device``. Triton on the CPU (its interpreter) is left
    out: its timings mean nothing."""
    from earlyexit_kernels.backends.registry import backends, resolve_backend

    names = []
    for name in ("cuda", "triton", "cpp"):
        if not backends()[name] or (name == "triton" and device.type != "cuda"):
            continue
        try:
            resolve_backend(name, device)
        except RuntimeError:
            continue
        names.append(name)
    return names


def eek_backends_for(names: list[str] | None, device: torch.device) -> list[str]:
    """The eek backends a run times: ``names`` (None: every compiled backend of the device, then torch),
    less those that cannot run on ``device``; ``ValueError`` where none is left."""
    from earlyexit_kernels.backends.registry import resolve_backend

    if names is None:
        return [*fast_backends(device), "torch"]
    kept = []
    for name in names:
        try:
            resolve_backend(name, device)
        except (RuntimeError, ValueError) as err:
            print(f"backend {name} left out: {err}", file=sys.stderr)
            continue
        kept.append(name)
    if not kept:
        raise ValueError(f"none of the backends {', '.join(names)} runs on {device}")
    return kept


def run(args, on_rows=None, notes: list[dict] | None = None) -> list[dict]:
    """Every configuration's rows; ``on_rows(rows)`` is called with each configuration's rows as they come.
    ``notes``: gets what each captured peer's SDPA calls were (``PeerModels.notes``), with its configuration."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    size = SIZES[args.size]
    eek_backends = eek_backends_for(args.backends, device)
    grid = _grid(args)
    spot_seq = min(args.seq_lens)
    tasks = []  # (arch, S, B, pattern)
    for arch in args.models:
        for s, b in grid:
            if args.patterns:
                tasks += [(arch, s, b, pattern_by_name(p, b, size.layers, s)) for p in args.patterns]
            else:
                tasks += [(arch, s, b, p) for p in standard_patterns(b, size.layers, s)]
    for arch in args.spot_models:
        if arch in args.models:
            continue
        b = args.spot_batch
        if args.patterns:
            tasks += [(arch, spot_seq, b, pattern_by_name(p, b, size.layers, spot_seq)) for p in args.patterns]
            continue
        spot = [scheduled(b, size.layers, 0.0, spot_seq), scheduled(b, size.layers, 0.5, spot_seq)]
        tasks += [(arch, spot_seq, b, p) for p in (*spot, geometric(b, size.layers, spot_seq))]
    for peer in args.peers:
        if (why := unavailable(peer, device)) is not None:
            print(f"peer {peer} skipped: {why}", file=sys.stderr)

    from tqdm import tqdm

    env = environment(device)
    common = {"config": size.label, "dtype": args.dtype}
    rows: list[dict] = []
    models, peer_models = {}, {}
    # what every configuration measures alike, built once; each takes its length and padding id
    common_settings = MeasureSettings(
        seq_len=0,
        vocab=size.vocab,
        pad_id=0,
        device=device,
        dtype=dtype,
        eek_backends=eek_backends,
        repeats=args.repeats,
        measure_memory=not args.no_memory,
        steps=tuple(args.step),
        graphed_lags=tuple(args.graphed_lags),
        graphed_prologue=args.graphed_prologue,
        graphed_torch_heads=args.graphed_torch_heads,
        bucket_sizes=None if args.bucket_table is None else sizes_from_file(args.bucket_table),
        policies=tuple(args.policies),
        peers=tuple(args.peers),
        baselines=not args.no_baselines,
    )
    with torch.inference_mode(), tqdm(total=len(tasks), disable=args.no_progress, unit="cfg", file=sys.stderr) as bar:
        for arch, s, b, pattern in tasks:
            load = {"load_1m": f"{os.getloadavg()[0]:.2f}"}
            bar.set_description(f"{arch} B={b} S={s} {pattern.name}")
            if arch not in models:
                models[arch] = build_model(
                    arch, size, max(args.seq_lens), device=device.type, dtype=dtype, attn=args.attn
                )
                peer_models[arch] = PeerModels(models[arch])
            model = models[arch]
            settings = dataclasses.replace(common_settings, seq_len=s, pad_id=pad_token_id(arch))
            seen = len(peer_models[arch].notes)
            with gc_paused() if args.timing_controls else contextlib.nullcontext():
                measured = measure_pattern(model, pattern, settings, peer_models[arch])
            for note in peer_models[arch].notes[seen:]:
                note = {"model": arch, "dtype": args.dtype, "pattern": pattern.name, **note}
                print(f"peer {note['peer']} {arch} B={b} S={s} {pattern.name}: {_note_line(note)}", file=sys.stderr)
                if notes is not None:
                    notes.append(note)
            attn = {"attn": model.config._attn_implementation}  # deberta_v3: eager whatever --attn says
            new = [{**env, **common, **attn, **load, "model": arch, **row} for row in measured]
            rows += new
            if on_rows is not None:
                on_rows(new)
            bar.update()
    return rows


def _note_line(note: dict) -> str:
    how = "captured" if note.get("captured") else "uncaptured"
    if note.get("refused"):
        return f"{how}, refused: {note['refused'][:400]}"
    return f"{how}, {note.get('summary', 'no SDPA call recorded')}"


def unpatched_times(rows: list[dict]) -> list[dict]:
    """Per configuration and unpatched model (eager and each peer): p20, p50 and p80 in seconds, or why it was
    not timed, and whether it is the configuration's strongest."""
    out = []
    for r in rows:
        if r.get("kind") != "e2e" or not r.get("peer"):
            continue
        entry = {k: r.get(k) for k in ("model", "dtype", "B", "S", "pattern", "peer")}
        if r.get("t_p50_s") is None:
            entry["check"] = r.get("check")
        else:
            entry |= {f"{q}_s": r[f"t_{q}_s"] for q in ("p20", "p50", "p80")}
            entry["strongest"] = r.get("strongest_peer") == r["peer"]
        out.append(entry)
    return out


def _unpatched_lines(entries: list[dict]) -> list[str]:
    """``unpatched bert bf16 B=64 S=128 sched-f0.00: eager p20 4.30 p50 5.35 p80 6.43 ms, ...``."""
    groups: dict[tuple, list[str]] = {}
    for e in entries:
        key = (e["model"], e["dtype"], e["B"], e["S"], e["pattern"])
        if "p50_s" in e:
            text = f"{e['peer']} p20 {e['p20_s'] * 1e3:.2f} p50 {e['p50_s'] * 1e3:.2f} p80 {e['p80_s'] * 1e3:.2f} ms"
            text += " (strongest)" if e["strongest"] else ""
        else:
            text = f"{e['peer']} {str(e.get('check'))[:120]}"
        groups.setdefault(key, []).append(text)
    return [f"unpatched {m} {d} B={b} S={s} {p}: {', '.join(t)}" for (m, d, b, s, p), t in groups.items()]


def _write_meta(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, indent=2, default=str) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_before = time.time(), os.getloadavg()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    so_far: list[dict] = []
    notes: list[dict] = []
    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_avg_before": [round(v, 2) for v in load_before],
    }

    def keep(new_rows: list[dict]) -> None:
        # bench.csv and meta.json rewritten after each configuration: a run killed part-way leaves what it measured
        so_far.extend(new_rows)
        write_csv(out / "bench.csv", so_far)
        if args.append_csv is not None:
            append_csv(args.append_csv, new_rows)
        _write_meta(out / "meta.json", {**meta, "rows": len(so_far), "unpatched": unpatched_times(so_far)})

    try:
        with timing_controls(args.timing_controls, threads=None if args.threads else 1) as controls:
            meta |= {"timing_controls": controls, "peer_attention": notes}
            rows = run(args, on_rows=keep, notes=notes)
    finally:
        torch.set_num_threads(threads_before)
    write_csv(out / "bench.csv", rows)
    plots = make_plots(rows, out)
    meta |= {
        "seconds": round(time.time() - start, 1),
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "rows": len(rows),
        "plots": [p.name for p in plots],
        "unpatched": unpatched_times(rows),
    }
    _write_meta(out / "meta.json", meta)
    print(f"wrote {out / 'bench.csv'} ({len(rows)} rows), {', '.join(p.name for p in plots)} in {meta['seconds']} s")
    if controls["enabled"]:
        print(f"timing controls: {_controls_line(controls)}")
    for line in _unpatched_lines(meta["unpatched"]):
        print(line)
    failed = 0
    for r in rows:
        check = str(r.get("check") or "ok")
        if check != "ok":
            failed += not check.startswith("skipped")
            what = "/".join(v for v in (r["method"], r["backend"], r.get("step"), r.get("policy")) if v)
            head = "SKIPPED" if check.startswith("skipped") else "CHECK FAILED"
            print(f"{head}: {r['model']} {what} B={r['B']} S={r['S']} {r['pattern']}: {check}")
    return 1 if failed else 0


def _controls_line(controls: dict) -> str:
    """The controls in one line: the core, the threads and the GPU's clocks before and after (or why not read)."""
    pin = f"CPU {controls['pinned_core']}" if "pinned_core" in controls else controls.get("pinned", "")
    parts = [f"pinned to {pin}" if "pinned_core" in controls else pin, f"{controls.get('threads')} torch thread(s)"]
    for when in ("before", "after"):
        state = controls.get(f"gpu_{when}", {})
        if "gpus" in state:
            gpus = "; ".join(
                f"GPU {g.get('index')} SM {g.get('clocks.sm')}, mem {g.get('clocks.mem')}, "
                f"{g.get('temperature.gpu')} C, {g.get('power.draw')}, reasons {g.get('clock_event_reasons') or 'none'}"
                for g in state["gpus"]
            )
            parts.append(f"{when}: {gpus}")
        else:
            parts.append(f"{when}: nvidia-smi {state.get('nvidia_smi', 'not read')}")
    return ", ".join(parts)
