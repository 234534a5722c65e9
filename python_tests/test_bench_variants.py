"""The benchmark suite measures what users run (issue 60): the step, the policy and the unpatched peers.

- every row of ``bench.csv`` says what ran (``policy``, ``step`` resolved, ``peer``), and a CSV
  written before those columns still reads;
- the Entropy variant of a pattern is a real ``Entropy`` policy whose heads make the rows exit
  exactly on the pattern (both steps, every family, both head forms), and says why where it cannot;
- ``--step`` reaches ``eek.patch(..., step=)`` and several steps run interleaved in one run;
- the ratios are taken against the fastest unpatched model that agrees with the eager one, and a
  peer that cannot run (no CUDA here) is a row that says so;
- the patterns are described for what they do (``sched-f0.50`` on 12 layers: every row after layer 6).

CPU only, tiny random models.
"""

import argparse
import csv
import time

import pytest
import torch

import earlyexit_kernels as eek
from benchmarks.suite import report
from earlyexit_kernels.bench import runner, sweep
from earlyexit_kernels.bench.models import ARCHITECTURES, SIZES, build_model, pad_token_id
from earlyexit_kernels.bench.pattern_names import describe_pattern
from earlyexit_kernels.bench.patterns import make_inputs, pattern_by_name, scheduled
from earlyexit_kernels.bench.peers import PeerModels, PeerUnavailable
from earlyexit_kernels.bench.results import COLUMNS, append_csv, read_csv, write_csv
from earlyexit_kernels.bench.threshold_pattern import THRESHOLD, PatternNotReproducible, entropy_variant
from earlyexit_kernels.patching.patch import current_adapter

TINY = SIZES["tiny"]
NEW_COLUMNS = ("policy", "step", "peer", "speedup_vs_peer", "strongest_peer")


def tiny(arch="bert", dtype=torch.float32, seq_len=16):
    return build_model(arch, TINY, seq_len, device="cpu", dtype=dtype, attn="sdpa")


def inputs(pattern, arch="bert", seq_len=16):
    return make_inputs(pattern, seq_len, TINY.vocab, pad_token_id(arch), "cpu")


def test_an_old_csv_reads_and_appending_to_it_rewrites_it_with_the_new_columns(tmp_path):
    old_columns = [c for c in COLUMNS if c not in NEW_COLUMNS]
    path = tmp_path / "bench.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({c: "" for c in old_columns} | {"kind": "e2e", "method": "eek", "backend": "cuda"})
    (row,) = read_csv(path)
    assert row["method"] == "eek" and all(row[c] == "" for c in NEW_COLUMNS)

    append_csv(path, [{"kind": "e2e", "method": "eek", "backend": "cuda", "step": "graphed", "policy": "Scheduled"}])
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        old, new = list(reader)
    assert old["backend"] == "cuda" and old["step"] == "" and new["step"] == "graphed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["sched-f0.00", "sched-f0.50", "geometric-p0.10", "padded-geometric"])
def test_the_entropy_variant_exits_on_the_pattern_with_both_steps(name, dtype):
    model = tiny(dtype=dtype)
    pattern = pattern_by_name(name, 8, TINY.layers, 16)
    ids, mask = inputs(pattern)
    with torch.inference_mode():
        eek.patch(model, eek.Scheduled(pattern.exit_layers), backend="torch")
        heads = current_adapter(model).heads
        before = [h.weight.clone() for h in heads.classifiers]
        policy, restore = entropy_variant(current_adapter(model), pattern, ids, mask)
        assert policy == eek.Entropy(THRESHOLD) and type(policy) is eek.Entropy  # a real Entropy policy
        for step in ("exact", "graphed"):
            eek.patch(model, policy, backend="auto", step=step)
            out = model(input_ids=ids, attention_mask=mask)
            assert torch.equal(out.exit_layer, pattern.exit_layers), (step, out.exit_layer, pattern.exit_layers)
        restore()
    assert all(torch.equal(h.weight, w) for h, w in zip(heads.classifiers, before))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_entropy_variant_follows_the_pattern_on_every_family_and_head_form(arch):
    model = tiny(arch)
    pattern = pattern_by_name("geometric-p0.10", 8, TINY.layers, 16)
    ids, mask = inputs(pattern, arch)
    with torch.inference_mode():
        for head in ("model", "mlp"):
            eek.patch(model, eek.Scheduled(pattern.exit_layers), backend="torch", head=head)
            policy, restore = entropy_variant(current_adapter(model), pattern, ids, mask)
            for step in ("exact", "graphed"):
                eek.patch(model, policy, backend="torch", step=step)
                exits = model(input_ids=ids, attention_mask=mask).exit_layer
                assert torch.equal(exits, pattern.exit_layers), (head, step)
            restore()
            # the heads as they were do not exit on the pattern: the fitted ones are what makes it
            assert not torch.equal(model(input_ids=ids, attention_mask=mask).exit_layer, pattern.exit_layers)


def test_the_entropy_variant_says_why_when_the_heads_cannot_place_the_rows():
    model = tiny()
    pattern = pattern_by_name("geometric-p0.10", 64, TINY.layers, 16)  # 64 rows, heads on 32 features
    ids, mask = inputs(pattern)
    with torch.inference_mode():
        eek.patch(model, eek.Scheduled(pattern.exit_layers), backend="torch")
        heads = current_adapter(model).heads
        before = [h.weight.clone() for h in heads.classifiers]
        with pytest.raises(PatternNotReproducible, match="more than a Linear on 32 features can place"):
            entropy_variant(current_adapter(model), pattern, ids, mask)
    assert all(torch.equal(h.weight, w) for h, w in zip(heads.classifiers, before))  # left as they were


class FakePeers(PeerModels):
    """Peers without CUDA: ``cuda-graphs`` returns the eager logits at once (faster than any forward),
    ``compile-reduce-overhead`` the eager forward after a pause (slower), ``wrong`` would give other logits."""

    def __init__(self, model, wrong_graphs=False):
        super().__init__(model)
        self.wrong_graphs = wrong_graphs

    def runner(self, peer, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask)
        if peer == "cuda-graphs":
            logits = out.logits + 1.0 if self.wrong_graphs else out.logits
            return lambda: type(out)(logits=logits)

        def slow():
            time.sleep(0.004)
            return self.model(input_ids=ids, attention_mask=mask)

        return slow


def measure(model, pattern, peer_models=None, **kw):
    settings = runner.MeasureSettings(
        seq_len=16,
        vocab=TINY.vocab,
        pad_id=0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        eek_backends=["torch"],
        measure_memory=False,
        **{"repeats": 1, **kw},
    )
    with torch.inference_mode():
        return runner.measure_pattern(model, pattern, settings, peer_models)


def test_every_row_says_what_ran_and_a_peer_without_cuda_is_a_row_saying_so():
    pattern = pattern_by_name("geometric-p0.10", 4, TINY.layers, 16)
    rows = measure(
        tiny(),
        pattern,
        steps=("exact", "graphed", "auto"),
        policies=("scheduled", "entropy"),
        peers=("cuda-graphs", "compile-reduce-overhead"),
        baselines=True,
    )
    eek_rows = [r for r in rows if r["method"] == "eek"]
    # auto is exact on the CPU: it runs once, as exact
    assert sorted((r["policy"], r["step"]) for r in eek_rows) == [
        (f"Entropy({THRESHOLD})", "exact"),
        (f"Entropy({THRESHOLD})", "graphed"),
        ("Scheduled", "exact"),
        ("Scheduled", "graphed"),
    ]
    assert all(r["check"] == "ok" for r in rows if r.get("t_p50_s") is not None), [r["check"] for r in rows]
    full = next(r for r in rows if r["method"] == "full")
    assert (full["peer"], full["policy"], full["step"]) == ("eager", "", "")
    assert {(r["policy"], r["step"]) for r in rows if r["method"] == "naive"} == {
        ("Scheduled", ""),
        (f"Entropy({THRESHOLD})", ""),
    }
    skipped = {r["peer"]: r for r in rows if r["method"] == "peer"}
    assert set(skipped) == {"cuda-graphs", "compile-reduce-overhead"}
    for r in skipped.values():
        assert r["check"].startswith("skipped: no CUDA device") and r.get("t_p50_s") is None
    # the strongest unpatched model here is the eager one
    timed = [r for r in rows if r.get("t_p50_s") is not None]
    assert all(r["strongest_peer"] == "eager" and r["speedup_vs_peer"] == r["speedup_vs_full"] for r in timed)
    # the Entropy policy pays its decision at every layer (exact: a read-back each), the graphed step none
    syncs = {r["step"]: r["host_syncs"] for r in eek_rows if r["policy"] != "Scheduled"}
    assert syncs["graphed"] < syncs["exact"]


def test_the_ratio_is_taken_against_the_fastest_peer_that_agrees_with_the_eager_model():
    model = tiny()
    pattern = scheduled(4, TINY.layers, 0.5, 16)
    rows = measure(
        model, pattern, peer_models=FakePeers(model), peers=("cuda-graphs", "compile-reduce-overhead"), baselines=False
    )
    peers = {r["peer"]: r for r in rows if r["peer"]}
    assert set(peers) == {"eager", "cuda-graphs", "compile-reduce-overhead"}
    assert all(r["check"] == "ok" for r in rows)
    graphs = peers["cuda-graphs"]
    assert peers["compile-reduce-overhead"]["t_p50_s"] > graphs["t_p50_s"]
    for r in rows:
        assert r["strongest_peer"] == "cuda-graphs"
        assert r["speedup_vs_peer"] == pytest.approx(graphs["t_p50_s"] / r["t_p50_s"])
    assert graphs["nonlayer_p50_s"] is None and peers["eager"]["nonlayer_p50_s"] is not None

    # a peer whose logits differ from the eager model's is reported, and never the one to beat
    rows = measure(model, pattern, peer_models=FakePeers(model, wrong_graphs=True), peers=("cuda-graphs",))
    wrong = next(r for r in rows if r["peer"] == "cuda-graphs")
    assert wrong["check"].startswith("logits differ from full")
    assert all(r["strongest_peer"] == "eager" for r in rows)


def test_the_compiled_peer_runs_on_a_copy_and_agrees_with_the_eager_model(monkeypatch):
    """The compile path itself, on the CPU (where no CUDA graphs are made): compiled once on a copy
    made before patching, timed beside the rest, its logits those of the eager model."""
    from earlyexit_kernels.bench import peers

    monkeypatch.setattr(peers, "unavailable", lambda peer, device: None)
    # The peer raises Dynamo's recompile limit; it is put back after by assignment (monkeypatch's
    # undo of a config alias such as cache_size_limit leaves the option hidden for later compiles).
    limit = torch._dynamo.config.recompile_limit
    model = tiny()
    peer_models = PeerModels(model)
    try:
        rows = measure(
            model, scheduled(4, TINY.layers, 0.5, 16), peer_models=peer_models, peers=("compile-reduce-overhead",)
        )
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = limit
    (peer,) = [r for r in rows if r["method"] == "peer"]
    if peer["check"].startswith("skipped") and "Cxx" in peer["check"]:
        pytest.skip(f"Inductor cannot compile for the CPU here: {peer['check']}")
    assert peer["check"] == "ok" and peer["t_p50_s"] > 0 and peer["peer"] == "compile-reduce-overhead"
    assert peer_models._compiled is not None and peer_models._compiled._orig_mod is not model
    best = min((r for r in rows if r["peer"]), key=lambda r: r["t_p50_s"])
    assert all(r["strongest_peer"] == best["peer"] for r in rows)


def test_a_peer_that_fails_to_start_is_a_skipped_row():
    class Failing(PeerModels):
        def runner(self, peer, ids, mask):
            raise PeerUnavailable("the forward could not be captured: RuntimeError: nope")

    model = tiny()
    rows = measure(model, scheduled(4, TINY.layers, 0.0, 16), peer_models=Failing(model), peers=("cuda-graphs",))
    (peer,) = [r for r in rows if r["method"] == "peer"]
    assert peer["check"] == "skipped: the forward could not be captured: RuntimeError: nope"
    assert all(r["check"] == "ok" for r in rows if r is not peer)


def test_the_step_option_reaches_eek_patch_and_the_csv(tmp_path, monkeypatch):
    args = sweep.parse_args(["--device", "cpu", "--step", "exact,graphed"])
    assert args.step == ["exact", "graphed"] and args.policies == ["scheduled"] and args.peers == []
    assert sweep.parse_args(["--device", "cpu", "--peers", "compile,cuda-graphs"]).peers == [
        "cuda-graphs",
        "compile-reduce-overhead",
    ]
    assert sweep.parse_args(["--device", "cpu", "--peers", "none"]).peers == []
    for bad in (["--step", "fast"], ["--policies", "maxprob"], ["--patterns", "half"], ["--peers", "onnx"]):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--device", "cpu", *bad])
    with pytest.raises(argparse.ArgumentTypeError, match="exact, graphed"):
        sweep._choices(("auto", "exact", "graphed"), "step")("fast")

    given = []
    real = runner.patch

    def recording_patch(model, policy, **kwargs):
        given.append((type(policy).__name__, kwargs.get("step")))
        return real(model, policy, **kwargs)

    monkeypatch.setattr(runner, "patch", recording_patch)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--size", "tiny", "--models", "bert", "--spot-models", "none", "--batch-sizes", "4"]
    argv += ["--seq-lens", "16", "--repeats", "1", "--threads", "1", "--no-micro", "--no-progress", "--no-memory"]
    argv += ["--patterns", "sched-f0.50", "--policies", "scheduled,entropy", "--step", "graphed,exact"]
    argv += ["--backends", "torch", "--no-baselines", "--output-dir", str(out)]
    assert sweep.main(argv) == 0
    assert {("Scheduled", "graphed"), ("Scheduled", "exact"), ("Entropy", "graphed"), ("Entropy", "exact")} <= set(
        given
    )
    rows = read_csv(out / "bench.csv")
    assert {(r["backend"], r["policy"], r["step"]) for r in rows if r["method"] == "eek"} == {
        ("torch", p, s) for p in ("Scheduled", f"Entropy({THRESHOLD})") for s in ("graphed", "exact")
    }
    assert all(r["check"] == "ok" and r["pattern"] == "sched-f0.50" for r in rows)

    # the report gives each step and policy its own column
    section = report.render([out / "bench.csv"], tmp_path)
    for column in ("eek (torch, exact, Scheduled)", f"eek (torch, graphed, Entropy({THRESHOLD}))"):
        assert f"| {column} |" in section


def test_graphed_lags_time_the_step_with_each_lag_and_say_which():
    """``--graphed-lags device,1``: the graphed step on the device's plan and with a count read a
    layer late, interleaved; the rows say ``graphed`` and ``graphed-lag1``, and agree."""
    assert sweep.parse_args(["--device", "cpu", "--graphed-lags", "device,0,1,0"]).graphed_lags == [None, 0, 1]
    for bad in ("-1", "late", ""):
        with pytest.raises(SystemExit):
            sweep.parse_args(["--device", "cpu", "--graphed-lags", bad])
    pattern = pattern_by_name("geometric-p0.10", 4, TINY.layers, 16)
    # the CPU's own lag is 0: asking for it again adds nothing
    rows = measure(tiny(), pattern, steps=("exact", "graphed"), graphed_lags=(None, 0, 1), baselines=False)
    steps = sorted(r["step"] for r in rows if r["method"] == "eek")
    assert steps == ["exact", "graphed", "graphed-lag1"]
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]
    lagged = next(r for r in rows if r["step"] == "graphed-lag1")
    assert lagged["graph_captures"] == 0 and lagged["graph_fallback"] == ""


def test_graphed_prologue_times_the_step_with_its_prologue_captured_beside_the_eager_one():
    """``--graphed-prologue``: a ``graphed-prologue`` row beside ``graphed`` (on the CPU both run
    uncaptured, and agree)."""
    assert sweep.parse_args(["--device", "cpu", "--graphed-prologue"]).graphed_prologue is True
    assert sweep.parse_args(["--device", "cpu"]).graphed_prologue is False
    pattern = pattern_by_name("geometric-p0.10", 4, TINY.layers, 16)
    rows = measure(tiny(), pattern, steps=("graphed",), graphed_prologue=True, baselines=False)
    steps = sorted(r["step"] for r in rows if r["method"] == "eek")
    assert steps == ["graphed", "graphed-prologue"]
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]


@pytest.mark.parametrize("f", [0.0, 0.25, 0.5, 0.75, 0.4])
@pytest.mark.parametrize("layers, batch", [(12, 64), (12, 7), (4, 4)])
def test_a_pattern_is_described_for_what_it_does(f, layers, batch):
    exits = scheduled(batch, layers, f, 16).exit_layers
    text = describe_pattern(f"sched-f{f:.2f}", layers, batch)
    low, high = int(exits.min()), int(exits.max())
    if low == layers:
        assert text == f"nobody exits early: every row runs all {layers} layers"
    elif low == high:
        assert text == f"every row exits after layer {low} of {layers}"
    else:
        assert text.startswith(f"every row exits after layer {low} of {layers}, {int((exits == high).sum())} of")


def test_the_gpu_section_of_the_docs_names_the_patterns_for_what_they_do():
    from pathlib import Path

    assert describe_pattern("sched-f0.50", 12, 64) == "every row exits after layer 6 of 12"
    assert describe_pattern("geometric-p0.10", 12, 64).startswith("10% of the rows still running exit after each")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    gpu = docs[docs.index("## On a GPU: the first session") :]
    assert "half the rows at layer 1" not in gpu and "every row exits after layer 6" in gpu


def test_write_csv_keeps_the_new_columns(tmp_path):
    write_csv(tmp_path / "b.csv", [{"kind": "e2e", "policy": "Entropy(0.3)", "step": "graphed", "peer": ""}])
    (row,) = read_csv(tmp_path / "b.csv")
    assert (row["policy"], row["step"]) == ("Entropy(0.3)", "graphed")


def test_a_bucket_table_times_the_graphed_step_in_the_sizes_it_chooses(tmp_path):
    """``--bucket-table``: a ``graphed-prologue-buckets`` row in the sizes a layer-cost table chooses
    beside ``graphed-prologue`` in the device's (on the CPU both uncaptured: they agree)."""
    from earlyexit_kernels.engine.graphed.buckets import sizes_from_file
    from earlyexit_kernels.engine.graphed.cost_table import LayerCostTable

    table = LayerCostTable(
        seconds={n: 1e-3 * (1 + (n - 1) // 8) for n in range(1, 17)},  # a step every 8 rows
        spread={n: 1e-5 for n in range(1, 17)},
        seq_len=16,
        device="cpu",
        dtype="float32",
        torch=torch.__version__,
    )
    path = tmp_path / "layer_costs.json"
    table.save(path)
    assert sizes_from_file(path) == (8, 16)
    assert sweep.parse_args(["--device", "cpu", "--bucket-table", str(path)]).bucket_table == path
    pattern = pattern_by_name("geometric-p0.10", 4, TINY.layers, 16)
    rows = measure(tiny(), pattern, steps=("graphed",), graphed_prologue=True, bucket_sizes=(8, 16), baselines=False)
    steps = sorted(r["step"] for r in rows if r["method"] == "eek")
    assert steps == ["graphed", "graphed-prologue", "graphed-prologue-buckets"]
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]


def test_graphed_torch_heads_times_the_step_with_the_models_head_modules():
    assert sweep.parse_args(["--device", "cpu", "--graphed-torch-heads"]).graphed_torch_heads is True
    pattern = pattern_by_name("geometric-p0.10", 4, TINY.layers, 16)
    rows = measure(
        tiny(), pattern, steps=("graphed",), graphed_prologue=True, graphed_torch_heads=True, baselines=False
    )
    steps = sorted(r["step"] for r in rows if r["method"] == "eek")
    assert steps == ["graphed", "graphed-prologue", "graphed-prologue-torchheads"]
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]
