"""The GPU script's dress rehearsal: ``scripts/gpu_session.sh`` run on the CPU as the GPU machine would run it.

The GPU machine gives one command about ten minutes, copies the working tree over, reaches no
package index, and its ``python3`` already holds torch (no project venv). The rehearsal builds
that shape here: a copy of the tree, a fresh interpreter that sees this environment's packages
through a ``.pth`` line (as ``/opt/torch/.venv`` holds its own), no index reachable, no CUDA. Then
every step must start; the build tries the CUDA kernels forced and falls back; the steps that
need a GPU are skipped with their reason; the deadline skips what no longer fits; ``$OUT`` ends
with at most 8 plain files (what the device tool brings back). The graphed step's speed rows,
first in the first plan, also run here with ``REHEARSE_SPEED=1`` (a tiny model on the CPU), so
that their command line is run end to end before a GPU machine runs it.

The build installs the package without its C++ extension here (``EARLYEXIT_SKIP_EXTENSION_BUILD``):
compiling the CPU kernels takes a minute on two cores, and ``make setup`` builds them anyway.
"""

import contextlib
import csv
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/gpu_session.sh"
FIRST_PLAN = (
    "probe build_cuda_forced build smoke graphed_key gaps correct_graphed layer_costs graphed_buckets "
    "graphed_b256_bf16 kernels "
    "peer_capture stream_bf16 serve_gpu compiled_peer "
    "graphed_b64_fp32 "
    "correct_kernels correct_engine correct_families speed_b64_bf16 speed_b64_fp32 auto host memcheck "
    "speed_b32_b256"
).split()
NEEDS_GPU = [s for s in FIRST_PLAN if s not in ("probe", "build_cuda_forced", "build")]

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None or shutil.which("git") is None,
    reason="needs bash, coreutils' timeout and git",
)


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory):
    """``(tree, python)``: a copy of the working tree and an interpreter shaped like the GPU machine's."""
    base = tmp_path_factory.mktemp("gpu_machine")
    tree = base / "tree"
    for name in _tracked_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    interpreter = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([interpreter, "-m", "venv", "--without-pip", str(base / "python")], check=True)
    python = base / "python" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # every folder of packages this interpreter reads: a venv made with --system-site-packages (setup_env.sh's,
    # where python3 already holds torch) reads the system's too, and the packages it did not install are there
    folders = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *folders])
    Path(site, "preinstalled_torch.pth").write_text("\n".join(ours) + "\n")
    return tree, python


def run_session(gpu_machine, out: Path, **env_overrides) -> tuple[subprocess.CompletedProcess, float]:
    tree, python = gpu_machine
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_", "EEK_"))}
    env.update(
        OUT=str(out),
        WORK=str(out.parent / f"{out.name}-work"),
        PY=str(python),
        CUDA_VISIBLE_DEVICES="",
        PIP_INDEX_URL="http://127.0.0.1:9/simple",  # nothing listens there: a fetch fails at once
        EARLYEXIT_SKIP_EXTENSION_BUILD="1",
        **env_overrides,
    )
    start = time.monotonic()
    result = subprocess.run(["bash", SCRIPT], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def script(name: str):
    """The module ``scripts/<name>.py`` (the GPU session's readers), imported by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trace_event(cat, name, ts, dur):
    """One event of a chrome trace as the profiler writes it."""
    return {"cat": cat, "name": name, "ts": ts, "dur": dur}


def step_lines(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return {m.group(1): m.group(2) for m in (re.match(r"^(\w+): (.*)$", line) for line in lines) if m}


def assert_what_comes_back(out: Path):
    """The device tool brings back at most 8 plain files, named in letters, digits, '.', '_' and '-'."""
    entries = list(out.rglob("*"))
    assert all(p.is_file() for p in entries), entries
    assert len(entries) <= 8, entries
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in entries), entries


def test_the_first_plan_starts_every_step_builds_and_skips_what_needs_a_gpu(gpu_machine, tmp_path):
    out = tmp_path / "out"
    result, seconds = run_session(gpu_machine, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < 50, f"the rehearsal took {seconds:.0f}s"
    steps = step_lines(out)
    assert [name for name in steps if name in FIRST_PLAN] == FIRST_PLAN
    assert steps["probe"].startswith("ok")
    # The forced CUDA build fails for its real reason, then the package builds without it.
    assert steps["build_cuda_forced"].startswith("FAILED") and "has no CUDA" in steps["build_cuda_forced"]
    assert steps["build"].startswith("ok")
    assert str(gpu_machine[0] / "earlyexit_kernels") in steps["installed"]
    for name in NEEDS_GPU:
        assert steps[name].startswith("skipped, no CUDA device"), (name, steps[name])
    assert steps["tests"] == "no results yet" and steps["speed"] == "no rows yet"
    assert_what_comes_back(out)
    assert {p.name for p in out.iterdir()} == {"summary.txt", "logs.tar.gz"}
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = set(logs.getnames())
    assert {"logs/probe.log", "logs/build_cuda_forced.log", "logs/build.log"} <= names
    assert result.stdout.startswith("gpu_session.sh PLAN=first")  # the summary, printed last


def test_a_graphed_speed_step_rehearsed_on_the_cpu_writes_rows_that_say_what_ran(gpu_machine, tmp_path):
    from earlyexit_kernels.bench.results import COLUMNS

    out = tmp_path / "out"
    result, seconds = run_session(gpu_machine, out, STEPS="build smoke graphed_key", REHEARSE_SPEED="1")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(out)
    assert steps["smoke"].startswith("ok") and steps["graphed_key"].startswith("ok"), steps
    with (out / "bench.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    timed = [r for r in rows if r["t_p50_s"]]
    assert {r["pattern"] for r in rows} == {"sched-f0.00", "sched-f0.50", "geometric-p0.10"}
    assert {(r["policy"], r["step"]) for r in timed if r["method"] == "eek"} == {
        (policy, step)
        for policy in ("Scheduled", "Entropy(0.3)")
        for step in ("exact", "graphed", "graphed-prologue", "graphed-prologue-torchheads")
    }  # (the CPU's own lag is 0: graphed-lag0 is the graphed row there)
    assert all(r["check"] == "ok" and r["dtype"] == "bf16" for r in timed)
    assert not any(r["method"] in ("naive", "bs1") for r in rows)
    peers = [r for r in rows if r["method"] == "peer"]
    # both captured peers (with its mask; without, fast attention forced); the compiled one has its own step
    assert {r["peer"] for r in peers} == {"cuda-graphs", "cuda-graphs-fast-attn"}
    assert all(r["check"].startswith("skipped: no CUDA device") for r in peers)
    # A graphed row says what it captured, replayed and ran uncaptured: nothing captured on the CPU.
    graphed = [r for r in timed if r["step"] == "graphed"]
    assert graphed and all(r["graph_captures"] == "0" and r["graph_fallback"] == "" for r in graphed)
    summary = (out / "summary.txt").read_text()
    # The smoke step's lines: per backend and policy, the graph counts, graphed against exact, the p50s.
    assert re.search(
        r"  (cpp|torch) Scheduled: captures 0, replays 0, uncaptured 0, .* exits equal; p50 plain", summary
    ), summary
    assert "  smoke: capture ok" in summary
    assert "sched-f0.50 (every row exits after layer 2 of 4): unpatched eager" in summary
    assert re.search(r"  geometric-p0.10 +eek/torch/graphed Entropy\(0.3\) +[0-9.]+x of [0-9.]+x", summary), summary
    assert_what_comes_back(out)


def test_the_layer_cost_step_rehearsed_on_the_cpu_brings_back_its_table_and_its_sizes_are_timed(gpu_machine, tmp_path):
    out = tmp_path / "out"
    result, _ = run_session(gpu_machine, out, STEPS="build layer_costs graphed_buckets", REHEARSE_SPEED="1")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(out)
    assert steps["layer_costs"].startswith("ok") and steps["graphed_buckets"].startswith("ok"), steps
    with (out / "bench.csv").open(newline="") as f:
        timed = {r["step"] for r in csv.DictReader(f) if r["method"] == "eek" and r["t_p50_s"]}
    assert timed == {"graphed", "graphed-prologue", "graphed-prologue-buckets"}
    table = (out / "layer_costs.md").read_text()
    assert "geometric-p0.10" in table and "sched-f0.50" in table
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert "logs/layer_costs/layer_costs.json" in logs.getnames()
    assert_what_comes_back(out)


def test_no_step_starts_that_the_deadline_leaves_no_time_for(gpu_machine, tmp_path):
    out = tmp_path / "out"
    # 25 s: the probe (5 s at least) starts; the build (30 s at least) never fits.
    result, seconds = run_session(gpu_machine, out, DEADLINE_S="25")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(out)
    assert steps["probe"].startswith("ok")
    for name in ("build_cuda_forced", "build"):
        assert re.match(r"skipped, deadline: -?\d+s left \(reserve 0s\), it needs 30s", steps[name]), steps[name]
    assert "installed" not in steps
    assert seconds < 25
    assert_what_comes_back(out)


def test_the_second_plan_and_unknown_steps_say_so(gpu_machine, tmp_path):
    out = tmp_path / "out"
    result, _ = run_session(gpu_machine, out, PLAN="second", STEPS="sweep micro sanitizers bogus")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = step_lines(out)
    for name in ("sweep", "micro", "memcheck_rest", "racecheck_cuda", "synccheck_cuda", "racecheck_triton"):
        assert steps[name].startswith("skipped, no CUDA device"), (name, steps[name])
    assert steps["bogus"].startswith("unknown step (plan second:")
    assert_what_comes_back(out)

    wrong, _ = run_session(gpu_machine, tmp_path / "wrong", PLAN="third")
    assert wrong.returncode == 2 and "PLAN must be first or second" in wrong.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4" time="12.5">
<testcase classname="python_tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="python_tests.test_a" name="test_ok_too" time="0.1"/>
<testcase classname="python_tests.test_a" name="test_bad" time="0.1"><failure message="AssertionError: 3 != 4&#10;more">trace</failure></testcase>
<testcase classname="python_tests.test_a" name="test_skipped" time="0.0"><skipped message="needs a GPU"/></testcase>
</testsuite></testsuites>
"""


def test_the_digest_merges_the_junit_runs_names_each_failure_and_lists_the_speed_ups(tmp_path):
    from earlyexit_kernels.bench.results import write_csv

    (tmp_path / "junit_correct_kernels.xml").write_text(JUNIT)
    passing = JUNIT.replace('failures="1"', 'failures="0"').replace(
        '<failure message="AssertionError: 3 != 4&#10;more">trace</failure>', ""
    )
    (tmp_path / "junit_correct_engine.xml").write_text(passing)
    row = {"kind": "e2e", "model": "bert", "config": "base", "dtype": "bf16", "B": 64, "S": 128, "device_name": "GPU"}
    write_csv(
        tmp_path / "bench.csv",
        [
            {**row, "method": "full", "backend": "hf", "pattern": "sched-f0.50"},
            {
                **row,
                "method": "eek",
                "backend": "triton",
                "pattern": "sched-f0.50",
                "speedup_vs_full": 1.8,
                "ideal_layers": 2.0,
                "ratio_ideal_layers": 0.9,
                "check": "ok",
            },
            # the layout since issue 60: the unpatched models of a pattern, then each row's step and policy
            *(
                {**row, "L": 12, "pattern": "geometric-p0.10", "strongest_peer": "cuda-graphs", **r}
                for r in (
                    {"method": "full", "backend": "hf", "peer": "eager", "t_p50_s": 0.0044, "check": "ok"},
                    {"method": "peer", "backend": "cuda-graphs", "peer": "cuda-graphs", "t_p50_s": 0.004},
                    {
                        "method": "peer",
                        "backend": "compile-reduce-overhead",
                        "peer": "compile-reduce-overhead",
                        "check": "skipped: torch.compile failed: BackendCompilerFailed: boom",
                    },
                    {
                        "method": "eek",
                        "backend": "cuda",
                        "step": "graphed",
                        "policy": "Entropy(0.3)",
                        "t_p50_s": 0.0029,
                        "speedup_vs_full": 1.5,
                        "ideal_layers": 1.67,
                        "ratio_ideal_layers": 0.9,
                        "speedup_vs_peer": 1.38,
                        "check": "ok",
                    },
                )
            ),
        ],
    )
    merged = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_session_report.py"),
            "digest",
            "--junit",
            str(tmp_path / "junit_correct_kernels.xml"),
            str(tmp_path / "junit_correct_engine.xml"),
            str(tmp_path / "junit_missing.xml"),
            "--merged",
            str(merged),
            "--bench",
            str(tmp_path / "bench.csv"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert "correct_kernels: 2 passed, 1 failed, 0 errors, 1 skipped in 12s" in lines
    assert "correct_engine: 3 passed, 0 failed, 0 errors, 1 skipped in 12s" in lines
    assert sum("FAILURE" in line for line in lines) == 1
    assert "  FAILURE python_tests.test_a::test_bad: AssertionError: 3 != 4" in lines
    assert "GPU, bert base bf16, B = 64, S = 128:" in lines
    assert any(re.fullmatch(r"  sched-f0.50 +eek/triton +1.80x of 2.00x \(0.90\)  ok", line) for line in lines), lines
    assert not any("full/hf" in line for line in lines)  # the baseline itself is no speed-up
    # per pattern: what it does, the unpatched models' times (the strongest marked, a skipped one with why)
    assert (
        "  geometric-p0.10 (10% of the rows still running exit after each layer, the rest after layer 12): "
        "unpatched eager 4.40 ms, cuda-graphs 4.00 ms (strongest), "
        "compile-reduce-overhead skipped: torch.compile failed: BackendCompilerFailed: boom"
    ) in lines, lines
    assert any(
        re.fullmatch(
            r"  geometric-p0.10 +eek/cuda/graphed Entropy\(0.3\) +1.50x of 1.67x \(0.90\), 1.38x cuda-graphs  ok",
            line,
        )
        for line in lines
    ), lines
    import xml.etree.ElementTree as ET

    suites = ET.parse(merged).getroot()
    assert [s.get("name") for s in suites] == ["correct_engine", "correct_kernels"]


def test_the_gaps_step_counts_the_device_s_idle_time_within_a_call():
    """``gpu_session_report.py gaps``' arithmetic, on intervals made up: the busy time is the union of
    the kernels inside the call, the idle time the stretches between them and before the first."""
    device_gaps = script("gpu_session_report").device_gaps
    kernels = [(10.0, 20.0), (15.0, 25.0), (40.0, 50.0), (49.0, 55.0), (70.0, 80.0), (-5.0, 2.0)]
    busy, gaps = device_gaps(kernels, 0.0, 80.0)
    assert busy == 2.0 + 15.0 + 15.0 + 10.0  # [0,2], [10,25], [40,55], [70,80]
    assert gaps == [(2.0, 8.0), (25.0, 15.0), (55.0, 15.0)]
    assert busy + sum(length for _, length in gaps) == 80.0
    assert device_gaps([], 0.0, 10.0) == (0.0, [])
    assert device_gaps([(3.0, 5.0)], 0.0, 5.0) == (2.0, [(0.0, 3.0)])


def test_the_gaps_step_names_where_the_busy_time_goes_per_call():
    """``kernel_times``: each kernel name's launches and device time per call, the largest first."""
    from types import SimpleNamespace

    kernel_times = script("gpu_session_report").kernel_times

    def kernel(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    events = [kernel("gemm", 0, 30), kernel("copy", 30, 32), kernel("gemm", 40, 70), kernel("copy", 70, 73)]
    assert kernel_times(events, calls=2) == [("gemm", (1.0, 30.0)), ("copy", (1.0, 2.5))]


def test_the_timeline_reader_finds_the_idle_time_before_and_after_the_first_graph(tmp_path):
    """``scripts/gpu_timeline.py`` on a made-up trace of two calls: the second call's device idles
    30 us while the host launches a kernel, 20 us while it launches a graph, and 10 us after."""
    import gzip
    import json

    module = script("gpu_timeline")
    call_timeline, load_events, main = module.call_timeline, module.load_events, module.main

    events = [
        trace_event("user_annotation", "eek_gaps_call", 0, 50),
        trace_event("kernel", "early", 1, 5),
        trace_event("user_annotation", "eek_gaps_call", 100, 50),
        trace_event("cuda_runtime", "cudaLaunchKernel", 105, 3),
        trace_event("kernel", "embed", 130, 10),
        trace_event("cuda_runtime", "cudaGraphLaunch", 145, 4),
        trace_event("kernel", "layer", 160, 40),
        trace_event("kernel", "layer", 210, 40),
    ]
    found = call_timeline(events, 1)
    assert found["gaps"] == [(0, 30, ["cudaLaunchKernel"]), (40, 20, ["cudaGraphLaunch"]), (100, 10, [])]
    # the idle stretch the graph launch falls in counts before it: the device waits for that launch
    assert (found["first_graph_launch"], found["idle_before"], found["idle_after"], found["end"]) == (45, 50, 10, 150)
    assert found["eager_launches"] == 1
    with pytest.raises(ValueError, match=r"holds 2 calls; ask for one in 0\.\.1"):
        call_timeline(events, 2)
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": events}, file)
    assert load_events(path) == events
    assert main([str(path), "--call", "1"]) == 0


def test_the_timeline_reader_counts_what_comes_before_the_first_layer(tmp_path):
    """With the graphed step's ``eek_first_layer`` mark: the launches (the prologue's graph among them)
    and synchronizations before it, and the device's idle time before it (issue 93's targets)."""
    call_timeline = script("gpu_timeline").call_timeline

    events = [
        trace_event("user_annotation", "eek_gaps_call", 0, 300),
        trace_event("cuda_runtime", "cudaLaunchKernel", 2, 3),  # the inputs' copy
        trace_event("kernel", "multi_tensor_apply", 10, 2),
        trace_event("cuda_runtime", "cudaGraphLaunch", 12, 4),  # the prologue
        trace_event("kernel", "embedding", 20, 30),
        trace_event("cuda_runtime", "cudaStreamSynchronize", 20, 32),  # its read-back
        trace_event("cuda_runtime", "cudaGraphLaunch", 60, 4),  # the load
        trace_event("kernel", "copy", 70, 10),
        trace_event("user_annotation", "eek_first_layer", 85, 5),
        trace_event("cuda_runtime", "cudaGraphLaunch", 86, 4),
        trace_event("kernel", "gemm", 100, 100),
    ]
    found = call_timeline(events, 0)
    assert found["first_layer"] == 85
    assert found["launches_before_first_layer"] == 3 and found["syncs_before_first_layer"] == 1
    # idle: 0-10, 12-20, 50-70, 80-100 (the last is the device waiting for the layer's launch)
    assert found["idle_before_first_layer"] == 10 + 8 + 20 + 20
    without = call_timeline([e for e in events if e["name"] != "eek_first_layer"], 0)
    assert "first_layer" not in without


def test_the_graphed_step_marks_its_first_layer_only_where_a_profiler_runs():
    import torch
    from conftest import tiny_batch, tiny_model
    from torch.profiler import ProfilerActivity, profile

    import earlyexit_kernels as eek
    from earlyexit_kernels.engine.graphed import static_step

    model = eek.patch(tiny_model("bert", num_layers=4), eek.Entropy(0.1), backend="torch", step="graphed")
    ids, mask, _ = tiny_batch(4, 8, seed=0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask)
        assert not isinstance(static_step._marked("eek_first_layer"), contextlib.nullcontext)
    assert sum(1 for e in prof.events() if e.name == "eek_first_layer") == 1
    # without a profiler the mark is nothing at all (no record_function on the hot path)
    assert isinstance(static_step._marked("eek_first_layer"), contextlib.nullcontext)
