"""The GPU session's small reports (scripts/gpu_session.sh); each subcommand prints to stdout.

    python scripts/gpu_session_report.py probe           # versions, the device, its limits, the tools
    python scripts/gpu_session_report.py auto            # what backend="auto" measures and picks
    python scripts/gpu_session_report.py shared-memory   # opt-in shared memory, the widest CUDA head
    python scripts/gpu_session_report.py smoke           # the graphed step's first check: captures, exactness, p50s
    python scripts/gpu_session_report.py peer-capture    # the CUDA-graph peer's warm-up stream, timed both ways
    python scripts/gpu_session_report.py kernels         # kernels per forward from the profiler, per backend
    python scripts/gpu_session_report.py digest --junit J1.xml J2.xml --merged junit.xml --bench bench.csv

``digest`` reads only XML and CSV (no torch), so it runs after every step: the tests' counts and
failures, and per configuration the unpatched models' times (eager and the peers, the strongest
marked), then each early-exit row's speed-up over the unpatched eager model beside its layer ideal
and against the strongest unpatched model, with the step and policy it ran. Each pattern is named
with what it does (``earlyexit_kernels/bench/pattern_names.py``, loaded by its path: no torch).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def probe() -> int:
    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} cores")
    for name in ("torch", "triton", "transformers", "xdist", "pytest_timeout", "pytest_benchmark"):
        try:
            module = importlib.import_module(name)
            print(f"{name} {getattr(module, '__version__', 'installed')}")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is what the probe reports
            print(f"{name}: not importable ({type(err).__name__})")
    for tool in ("nvcc", "compute-sanitizer", "ninja", "nvidia-smi"):
        path = shutil.which(tool)
        version = ""
        if path and tool in ("nvcc", "ninja"):
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            version = out[-1] if out else ""
        print(f"{tool}: {path or 'not found'} {version}".rstrip())
    import torch

    print(f"torch CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        print(
            f"cuda:{index} {p.name} sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.1f} GiB, opt-in shared memory per block {p.shared_memory_per_block_optin} bytes"
        )
    return 0


def auto() -> int:
    import torch

    from earlyexit_kernels.backends import choice, registry

    device = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        registry.resolve_backend("auto", device, dtype=dtype, hidden_size=768, num_labels=2)
    for key, (name, seconds) in choice.auto_choices().items():
        timed = {k: round(v * 1e6, 1) for k, v in seconds.items()}
        print(key, "->", name, timed, f"us (summed over batches {choice.TIMED_BATCHES})")
    # The crossover: each candidate per batch size (fp16, H = 768, 2 labels).
    for batch in (1, 16, 64, 256, 1024):
        times = {
            name: round(
                choice.step_seconds(registry.resolve_backend(name, device), device, torch.float16, 768, 2, batch=batch)
                * 1e6,
                1,
            )
            for name in ("cuda", "triton")
            if registry.backends()[name]
        }
        print(f"batch {batch}: {times} us")
    return 0


def shared_memory() -> int:
    import torch

    from earlyexit_kernels.backends import cpp_backend

    p = torch.cuda.get_device_properties(0)
    optin = p.shared_memory_per_block_optin
    print(p.name, f"sm_{p.major}{p.minor}", "opt-in shared memory per block:", optin, "bytes")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        widest = max(h for h in range(8, 65536, 8) if cpp_backend.cuda_head_fits(h, dtype, optin))
        print(dtype, "widest CUDA head: H =", widest)
    return 0


def smoke(device_name: str, size_name: str, batch: int, seq_len: int, dtype_name: str, repeats: int, marker) -> int:
    """The graphed step's first check on a device: BERT at ``batch`` x ``seq_len`` on each compiled
    backend, ``Scheduled`` on geometric-p0.10 and its Entropy variant; per row the captures, replays,
    steps run uncaptured and why, the first capture's time, the graphed step's logits and exits
    against the exact step's, and the p50 of ``repeats`` interleaved calls of the unpatched model,
    the exact and the graphed step. Where any capture failed, writes its reason to ``marker``."""
    import statistics

    import torch

    import earlyexit_kernels as eek
    from earlyexit_kernels.bench.models import SIZES, build_model
    from earlyexit_kernels.bench.patterns import geometric, make_inputs
    from earlyexit_kernels.bench.threshold_pattern import entropy_variant
    from earlyexit_kernels.bench.timing import synchronize, timed_call
    from earlyexit_kernels.engine.graphed.step_graphs import capture_failure
    from earlyexit_kernels.patching.patch import current_adapter
    from earlyexit_kernels.patching.state import attach, state_of

    device = torch.device(device_name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    size = SIZES[size_name]
    model = build_model("bert", size, seq_len, device=device_name, dtype=dtype, attn="sdpa")
    pattern = geometric(batch, size.layers, seq_len)
    ids, mask = make_inputs(pattern, seq_len, size.vocab, 0, device)
    backends = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpp", "torch")) if eek.backends()[b]]
    print(f"smoke: {device_name} {dtype_name} bert-{size_name} B = {batch}, S = {seq_len}, {pattern.name}")
    failed = None
    for backend in backends:
        eek.patch(model, eek.Scheduled(pattern.exit_layers.to(device)), backend=backend, step="exact")
        policies = [("Scheduled", eek.Scheduled(pattern.exit_layers.to(device)))]
        try:
            entropy, restore = entropy_variant(current_adapter(model), pattern, ids, mask)
            policies.append(("Entropy", entropy))
        except Exception as err:  # noqa: BLE001 - the row says why it is missing
            print(f"  {backend} Entropy: not reproducible ({err})")
        for label, policy in policies:
            records = {}

            def call(step, policy=policy, records=records, backend=backend):
                eek.patch(model, policy, backend=backend, step=step)
                if step in records:
                    attach(model, records[step])
                else:
                    records[step] = state_of(model)
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask)

            exact = call("exact")
            start = time.perf_counter()
            graphed = call("graphed")
            synchronize(device)
            first_call = time.perf_counter() - start
            stats = records["graphed"].static_batches.stats
            times = {"plain": [], "exact": [], "graphed": []}

            def plain():
                if eek.is_patched(model):
                    eek.unpatch(model)
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask)

            runs = {"plain": plain, "exact": lambda: call("exact"), "graphed": lambda: call("graphed")}
            for _ in range(repeats):
                for name, fn in runs.items():
                    times[name].append(timed_call(fn, device)[0])
            p50 = {k: statistics.median(v) for k, v in times.items()}
            diff = (graphed.logits.float() - exact.logits.float()).abs().max().item()
            same_exits = bool(torch.equal(graphed.exit_layer, exact.exit_layer))
            print(
                f"  {backend} {label}: captures {stats.captures}, replays {stats.replays}, uncaptured {stats.eager}, "
                f"first capture {stats.first_capture_s if stats.first_capture_s is None else round(stats.first_capture_s, 3)} s, "
                f"first graphed call {first_call:.3f} s; graphed - exact logits max |diff| {diff:.3g}, "
                f"exits {'equal' if same_exits else 'DIFFER'}; p50 plain {p50['plain'] * 1e3:.2f} ms, "
                f"exact {p50['exact'] * 1e3:.2f} ms ({p50['plain'] / p50['exact']:.2f}x), "
                f"graphed {p50['graphed'] * 1e3:.2f} ms ({p50['plain'] / p50['graphed']:.2f}x)"
                + (f"; FALLBACK: {stats.fallback}" if stats.fallback else "")
            )
            failed = failed or stats.fallback
            if label == "Entropy":
                restore()
        eek.unpatch(model)
    failed = failed or capture_failure()
    if failed and marker is not None:
        Path(marker).write_text(failed + "\n")
    print(f"smoke: capture {'FAILED: ' + failed if failed else 'ok'}")
    return 0


def peer_capture(batch: int, seq_len: int, repeats: int) -> int:
    """The unpatched BERT-base forward (bf16, no padding) eager and captured in a CUDA graph, each
    without a mask and with the all-ones mask a tokenizer gives; captured with the warm-up on a
    side stream (the peer as the first GPU sessions ran it) and on the capture stream (the peer
    now). p50 of ``repeats`` interleaved calls, then each variant's five costliest kernels from the
    profiler. (The first GPU session timed the captured forward without a mask at 10.3 ms, and
    with a padding mask at 4.06 ms, against 4.7-9.4 ms for the eager forward with the all-ones mask.)
    Its own process: a failed capture here stops no other step's captures."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    from earlyexit_kernels.bench.models import SIZES, build_model
    from earlyexit_kernels.bench.timing import timed_call
    from earlyexit_kernels.engine.graphed.step_graphs import capture_stream

    device = torch.device("cuda")
    model = build_model("bert", SIZES["base"], seq_len, device="cuda", dtype=torch.bfloat16, attn="sdpa")
    ids = torch.randint(5, 30000, (batch, seq_len), device=device)
    ones = torch.ones_like(ids)

    def captured(with_mask: bool, same_stream: bool):
        static = {"input_ids": ids.clone(), "attention_mask": ones.clone() if with_mask else None}
        warm = capture_stream(device) if same_stream else torch.cuda.Stream(device)
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm):
            for _ in range(3):
                model(**static)
        torch.cuda.current_stream(device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream(device) if same_stream else None):
            model(**static)

        def run():
            static["input_ids"].copy_(ids)
            graph.replay()

        return run

    runs = {"eager, no mask": lambda: model(input_ids=ids), "eager, all-ones mask": lambda: model(ids, ones)}
    with torch.inference_mode():
        for with_mask in (False, True):
            for same_stream in (False, True):
                name = f"captured, {'all-ones mask' if with_mask else 'no mask'}, warm-up on the " + (
                    "capture stream" if same_stream else "side stream"
                )
                try:
                    runs[name] = captured(with_mask, same_stream)
                except Exception as err:  # noqa: BLE001 - the line says why this variant is missing
                    print(f"peer-capture {name}: capture failed: {type(err).__name__}: {str(err)[:160]}")
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed_call(fn, device)[0])
        eager = statistics.median(times["eager, all-ones mask"])
        for name, values in times.items():
            p50 = statistics.median(values)
            print(
                f"peer-capture B = {batch}, S = {seq_len}, bf16, {name}: p50 {p50 * 1e3:.2f} ms ({eager / p50:.2f}x eager)"
            )
        for name, fn in runs.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:5]
            kernels = "; ".join(f"{e.key[:60]} x{e.count} {e.device_time_total / 1e3:.2f} ms" for e in top)
            print(f"peer-capture kernels, {name}: {kernels}")
    return 0


def kernels(batch: int, seq_len: int) -> int:
    """Kernels per forward from the profiler (BERT-base, bf16): the unpatched model eager, and the
    patched model's graphed step replayed (Scheduled, every row through all 12 layers: every layer
    an exit layer where rows may leave, the last a layer where all do) on each GPU backend. The
    difference per layer is what the exit step adds to the encoder layer's own kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import earlyexit_kernels as eek
    from earlyexit_kernels.bench.models import SIZES, build_model

    device = torch.device("cuda")
    size = SIZES["base"]
    model = build_model("bert", size, seq_len, device="cuda", dtype=torch.bfloat16, attn="sdpa")
    ids = torch.randint(5, 30000, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2 :] = 0  # padded: the mask path, as served batches are

    def counted(fn) -> int:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name)

    with torch.no_grad():
        plain = counted(lambda: model(input_ids=ids, attention_mask=mask))
        print(
            f"kernels: unpatched eager forward {plain} ({plain / size.layers:.1f} per layer, embeddings and head included)"
        )
        schedule = torch.full((batch,), size.layers, dtype=torch.long, device=device)
        schedule[: batch // 4] = torch.arange(1, batch // 4 + 1, device=device) % (size.layers - 1) + 1
        for backend in [b for b in ("cuda", "triton") if eek.backends()[b]]:
            for label, policy in (("Scheduled", eek.Scheduled(schedule)), ("Entropy", eek.Entropy(0.0))):
                eek.patch(model, policy, backend=backend, step="graphed")
                n = counted(lambda: model(input_ids=ids, attention_mask=mask))
                print(
                    f"kernels: {backend} graphed {label} forward {n}: {(n - plain) / size.layers:.1f} per layer "
                    f"beyond the unpatched model's"
                )
            eek.patch(model, eek.Entropy(0.0), backend=backend, step="exact")
            n = counted(lambda: model(input_ids=ids, attention_mask=mask))
            print(f"kernels: {backend} exact Entropy forward {n}: {(n - plain) / size.layers:.1f} per layer beyond")
            eek.unpatch(model)
    return 0


def print_first_layer(name: str, trace: Path, calls: int) -> None:
    """The ``gaps-first-layer`` line of one configuration: what its median call launched, read back and
    left the device idle for before the graphed step's first layer (``scripts/gpu_timeline.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from gpu_timeline import call_timeline, load_events
    finally:
        sys.path.pop(0)
    try:
        found = call_timeline(load_events(trace), calls // 2)
    except (ValueError, OSError, KeyError) as err:
        print(f"gaps-first-layer: {name}: the timeline could not be read ({err})")
        return
    if "first_layer" not in found:
        return  # not the graphed step
    print(
        f"gaps-first-layer: {name}: {found['launches_before_first_layer']} launches (graphs included) and "
        f"{found['syncs_before_first_layer']} synchronizations before the first layer graph, the device idle "
        f"{found['idle_before_first_layer'] / 1e3:.3f} ms before it (the profiler slows the host)"
    )


def device_gaps(
    kernels: list[tuple[float, float]], start: float, end: float
) -> tuple[float, list[tuple[float, float]]]:
    """``(busy, gaps)`` of the device over ``[start, end]``: ``busy`` the length of the union of the
    ``kernels``' ``(start, end)`` intervals inside it, ``gaps`` each stretch with no kernel running as
    ``(start, length)``, in time order (the one before the first kernel included, the one after the
    last not: the call ends with its last kernel)."""
    busy, gaps, at = 0.0, [], start
    for first, last in sorted((max(a, start), min(b, end)) for a, b in kernels if b > start and a < end):
        if first > at:
            gaps.append((at, first - at))
        if last > at:
            busy += last - max(first, at)
            at = last
    return busy, gaps


def kernel_times(device_events, calls: int) -> list[tuple[str, tuple[float, float]]]:
    """``(name, (launches, microseconds))`` per call of each device kernel name (copies included),
    the most device time first."""
    per_name: dict[str, list[float]] = {}
    for event in device_events:
        count_spent = per_name.setdefault(event.name, [0.0, 0.0])
        count_spent[0] += 1 / calls
        count_spent[1] += (event.time_range.end - event.time_range.start) / calls
    return sorted(((k, (c, t)) for k, (c, t) in per_name.items()), key=lambda item: -item[1][1])


def gaps(batch: int, seq_len: int, calls: int = 5) -> int:
    """Where a forward leaves the GPU idle (BERT-base, bf16, an unpadded batch): the unpatched model
    captured in a CUDA graph with its mask, and the graphed step where nobody exits (``Scheduled``,
    no head; ``Entropy(0.0)``, a head and a decision at every layer), each with its prologue eager
    and captured. Per call (the median of
    ``calls``, each timed from the host's start of the call to its last kernel's end): the wall time,
    the device's busy time, the idle before its first kernel, the idle between kernels, and the three
    longest gaps with the host op running where each starts: what stands between the graphed step
    and the captured model."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import earlyexit_kernels as eek
    from earlyexit_kernels.bench.models import SIZES, build_model
    from earlyexit_kernels.bench.peers import PeerModels
    from earlyexit_kernels.engine.graphed.static_step import StaticBatches
    from earlyexit_kernels.patching.state import state_of

    device = torch.device("cuda")
    size = SIZES["base"]
    model = build_model("bert", size, seq_len, device="cuda", dtype=torch.bfloat16, attn="sdpa")
    ids = torch.randint(5, 30000, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)

    def measured(name: str, fn) -> None:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                with record_function("eek_gaps_call"):
                    fn()
                torch.cuda.synchronize()
        # the timeline, kept for reading back on a machine without a GPU where EEK_GAPS_TRACE_DIR is set,
        # and read here for what came before the graphed step's first layer (its eek_first_layer mark)
        folder = Path(os.environ.get("EEK_GAPS_TRACE_DIR") or tempfile.mkdtemp(prefix="eek_gaps_"))
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".json")
        prof.export_chrome_trace(str(trace))
        print_first_layer(name, trace, calls)
        events = list(prof.events())
        # the call's own annotation has a device-side twin spanning the whole call: not a kernel
        device_events = [e for e in events if e.device_type.name == "CUDA" and e.name != "eek_gaps_call"]
        host_ops = [e for e in events if e.device_type.name == "CPU" and e.name != "eek_gaps_call"]
        rows = []
        starts = sorted(e.time_range.start for e in events if e.name == "eek_gaps_call" and e.device_type.name == "CPU")
        for start, following in zip(starts, [*starts[1:], float("inf")]):
            # this call's kernels: those that start before the next call does (each call is synchronized)
            inside = [
                (e.time_range.start, e.time_range.end) for e in device_events if start <= e.time_range.start < following
            ]
            if not inside:
                continue
            end = max(b for _, b in inside)
            busy, idle = device_gaps(inside, start, end)
            lead = idle[0][1] if idle and idle[0][0] == start else 0.0
            rows.append((end - start, busy, lead, sum(g for _, g in idle) - lead, idle))
        if not rows:
            print(f"gaps: {name}: no device kernel seen by the profiler")
            return
        wall, busy, lead, between = (statistics.median(r[i] for r in rows) for i in range(4))
        longest = sorted(rows[len(rows) // 2][4], key=lambda g: -g[1])[:3]

        def during(at: float) -> str:
            ops = [e for e in host_ops if e.time_range.start <= at <= e.time_range.end]
            return min(ops, key=lambda e: e.time_range.end - e.time_range.start).name[:50] if ops else "no host op"

        where = "; ".join(f"{g / 1e3:.3f} ms during {during(a)}" for a, g in longest)
        print(
            f"gaps: {name}: wall {wall / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms, idle before the first kernel "
            f"{lead / 1e3:.2f} ms, between kernels {between / 1e3:.2f} ms; longest: {where}"
        )
        # where the busy time goes: each kernel name's launches and device time per call, the largest first
        for kernel, (count, spent) in kernel_times(device_events, calls)[:12]:
            print(f"gaps-kernel: {name}: {spent / 1e3:.3f} ms in {count:g} x {kernel[:90]}")
        # and the host's: the ops (and CUDA runtime calls) with the most self time per call
        for item in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:12]:
            print(
                f"gaps-host: {name}: {item.self_cpu_time_total / calls / 1e3:.3f} ms self in "
                f"{item.count / calls:g} x {item.key[:80]}"
            )

    with torch.no_grad():
        captured = PeerModels(model).runner("cuda-graphs", ids, mask)
        measured("unpatched, captured with its mask", captured)
        del captured
        everyone = torch.full((batch,), size.layers, dtype=torch.long, device=device)
        for label, policy in (("Scheduled", eek.Scheduled(everyone)), ("Entropy(0.0)", eek.Entropy(0.0))):
            for backend in [b for b in ("cuda", "triton") if eek.backends()[b]]:
                eek.patch(model, policy, backend=backend, step="graphed")
                measured(
                    f"graphed {label} on {backend}, nobody exits", lambda: model(input_ids=ids, attention_mask=mask)
                )
                # the same with the prologue (inputs' summary, embeddings) captured too: what it leaves
                state_of(model).static_batches = StaticBatches(prologue=True)
                measured(
                    f"graphed {label} on {backend}, nobody exits, prologue captured",
                    lambda: model(input_ids=ids, attention_mask=mask),
                )
        eek.unpatch(model)
    return 0


def _junit(paths: list[Path], merged: Path | None) -> list[str]:
    lines, suites = [], ET.Element("testsuites")
    for path in sorted(paths):
        if not path.is_file():
            continue
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            lines.append(f"{path.name}: unreadable ({err})")
            continue
        found = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in found:
            suite.set("name", path.stem.removeprefix("junit_"))
            suites.append(suite)
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            lines.append(
                f"{suite.get('name')}: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped in {float(suite.get('time', 0)):.0f}s"
            )
            for case in suite.iter("testcase"):
                for bad in (*case.findall("failure"), *case.findall("error")):
                    message = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
                    lines.append(f"  {bad.tag.upper()} {case.get('classname')}::{case.get('name')}: {message}")
    if merged is not None and len(suites):
        merged.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(suites).write(merged, encoding="utf-8", xml_declaration=True)
    return lines or ["tests: no results yet"]


def _pattern_names():
    path = Path(__file__).resolve().parents[1] / "earlyexit_kernels" / "bench" / "pattern_names.py"
    spec = importlib.util.spec_from_file_location("_eek_pattern_names", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _what_ran(r: dict) -> str:
    """``eek/cuda/graphed Entropy(0.3)``: method, backend, step, then the policy (older CSVs: method/backend)."""
    label = "/".join(v for v in (r["method"], r["backend"], r.get("step")) if v)
    return f"{label} {r['policy']}" if r.get("policy") else label


def _bench(path: Path | None) -> list[str]:
    if path is None or not path.is_file():
        return ["speed: no rows yet"]
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kind") == "e2e"]
    if not [r for r in rows if r.get("method") not in ("full", "")]:
        return ["speed: no rows yet"]
    describe = _pattern_names().describe_pattern
    lines = [
        "speed-up over the unpatched eager model (p50) of the layer ideal (their ratio), "
        "against the strongest unpatched model, check"
    ]
    group = pattern = None
    for r in rows:
        if (r["device_name"], r["model"], r["dtype"], r["B"], r["S"]) != group:
            group = (r["device_name"], r["model"], r["dtype"], r["B"], r["S"])
            lines.append(f"{r['device_name']}, {r['model']} {r['config']} {r['dtype']}, B = {r['B']}, S = {r['S']}:")
            pattern = None
        if r["pattern"] != pattern and (r.get("peer") or r.get("policy")):  # the new layout: one line per pattern
            pattern = r["pattern"]
            mine = [u for u in rows if (u["device_name"], u["model"], u["dtype"], u["B"], u["S"]) == group]
            unpatched = [u for u in mine if u["pattern"] == pattern and u.get("peer")]
            times = [
                f"{u['peer']} {float(u['t_p50_s']) * 1e3:.2f} ms"
                + (" (strongest)" if u["peer"] == u["strongest_peer"] else "")
                if u.get("t_p50_s")
                else f"{u['peer']} {u['check'][:90]}"
                for u in unpatched
            ]
            what = describe(pattern, int(r["L"]), int(r["B"])) if r.get("L") else pattern
            lines.append(f"  {pattern} ({what}): unpatched {', '.join(times) or 'not timed'}")
        if r["method"] == "full" or r.get("method") == "peer":
            continue
        if r.get("check", "").startswith("skipped"):
            lines.append(f"  {r['pattern']:<17} {_what_ran(r):<30} {r['check']}")
            continue
        number = {k: float(r.get(k) or "nan") for k in ("speedup_vs_full", "ideal_layers", "ratio_ideal_layers")}
        peer = ""
        if r.get("speedup_vs_peer") and r.get("strongest_peer"):
            peer = f", {float(r['speedup_vs_peer']):.2f}x {r['strongest_peer']}"
        graphs = ""
        if r.get("graph_captures"):  # a graphed row: what it captured, replayed and ran uncaptured
            graphs = (
                f"  graphs {r['graph_captures']} captured, {r['graph_replays']} replays, {r['graph_eager']} uncaptured"
            )
            if r.get("graph_fallback"):
                graphs += f" ({r['graph_fallback'][:120]})"
        lines.append(
            f"  {r['pattern']:<17} {_what_ran(r):<30} {number['speedup_vs_full']:5.2f}x of {number['ideal_layers']:.2f}x "
            f"({number['ratio_ideal_layers']:.2f}){peer}  {r['check']}{graphs}"
        )
    return lines


def digest(junit: list[Path], merged: Path | None, bench: Path | None) -> int:
    print("\n".join([*_junit(junit, merged), *_bench(bench)]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe")
    sub.add_parser("auto")
    sub.add_parser("shared-memory")
    m = sub.add_parser("smoke")
    m.add_argument("--device", default="cuda")
    m.add_argument("--size", default="base")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    m.add_argument("--repeats", type=int, default=10)
    m.add_argument("--marker", type=Path, help="where a capture failure's reason is written")
    pc = sub.add_parser("peer-capture")
    pc.add_argument("--batch", type=int, default=64)
    pc.add_argument("--seq-len", type=int, default=128)
    pc.add_argument("--repeats", type=int, default=20)
    k = sub.add_parser("kernels")
    k.add_argument("--batch", type=int, default=64)
    k.add_argument("--seq-len", type=int, default=128)
    g = sub.add_parser("gaps")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--seq-len", type=int, default=128)
    d = sub.add_parser("digest")
    d.add_argument("--junit", type=Path, nargs="*", default=[], help="pytest junit XML files (missing ones ignored)")
    d.add_argument("--merged", type=Path, help="write the junit files' suites here as one file")
    d.add_argument("--bench", type=Path, help="the bench CSV (eek bench sweep)")
    args = parser.parse_args(argv)
    if args.command == "digest":
        return digest(args.junit, args.merged, args.bench)
    if args.command == "peer-capture":
        return peer_capture(args.batch, args.seq_len, args.repeats)
    if args.command == "kernels":
        return kernels(args.batch, args.seq_len)
    if args.command == "gaps":
        return gaps(args.batch, args.seq_len)
    if args.command == "smoke":
        return smoke(args.device, args.size, args.batch, args.seq_len, args.dtype, args.repeats, args.marker)
    return {"probe": probe, "auto": auto, "shared-memory": shared_memory}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
