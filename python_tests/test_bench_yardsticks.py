"""The benchmark's yardsticks (issue 93 item 4): the captured peers and the timing controls.

- the unpatched model captured two ways, with its mask (``cuda-graphs``) and without one on SDPA's
  fast kernels only (``cuda-graphs-fast-attn``), both rows, the ratios against the faster; on the
  CPU they run uncaptured under the same attention settings (``PeerModels(capture=False)``), and
  by default are rehearsed so and then reported skipped, saying how the rehearsal went;
- what SDPA was handed while the peer was made is recorded: the mask's shape, strides and dtype
  (the all-true mask transformers 5.17 builds while capturing, stride 0 along the keys, is
  recorded and dropped), each fast kernel's verdict and torch's reasons where one refuses;
- fast kernels that cannot run the call give a skipped row with torch's error and the calls seen;
- the timing controls put back what they change (the garbage collector, also on an exception;
  the thread's CPUs; torch's threads), a missing nvidia-smi is reported, not raised, and what
  they did lands in the sweep's meta.json beside each unpatched model's p20, p50 and p80.

CPU only, tiny random models.
"""

import gc
import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers.masking_utils
from test_bench_variants import TINY, tiny
from test_bench_variants import measure as measure_variants

from earlyexit_kernels.bench import peer_attention, sweep, timing_controls
from earlyexit_kernels.bench.patterns import make_inputs, scheduled
from earlyexit_kernels.bench.peers import PeerModels, check_peer_names

GRAPHED = ("cuda-graphs", "cuda-graphs-fast-attn")


def measure(model, pattern, peer_models, repeats=3, peers=GRAPHED):
    return measure_variants(model, pattern, peer_models, repeats=repeats, peers=peers, baselines=False)


@pytest.fixture
def mask_while_capturing(monkeypatch):
    """transformers as 5.17 behaves inside a CUDA graph capture: the mask is never skipped, so with none
    given it builds ``q_idx >= 0`` expanded to [B, 1, S, S] (stride 0 along the keys)."""
    monkeypatch.setattr(transformers.masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False)


def test_both_captured_peers_are_rows_and_the_ratios_are_against_the_fastest_unpatched_model():
    model = tiny()
    peer_models = PeerModels(model, capture=False)
    rows = measure(model, scheduled(4, TINY.layers, 0.5, 16), peer_models)
    unpatched = {r["peer"]: r for r in rows if r["peer"]}
    assert set(unpatched) == {"eager", *GRAPHED}
    assert all(r["check"] == "ok" for r in rows), [r["check"] for r in rows]
    fastest = min(unpatched.values(), key=lambda r: r["t_p50_s"])
    for r in rows:
        assert r["t_p20_s"] <= r["t_p50_s"] <= r["t_p80_s"]
        assert r["strongest_peer"] == fastest["peer"]
        assert r["speedup_vs_peer"] == pytest.approx(fastest["t_p50_s"] / r["t_p50_s"])
    # one note per captured peer: uncaptured here, the fast one held to the fast kernels, no mask given
    notes = {n["peer"]: n for n in peer_models.notes}
    assert set(notes) == set(GRAPHED) and not any(n["captured"] for n in notes.values())
    assert notes["cuda-graphs-fast-attn"]["forced"] == list(peer_attention.FAST_BACKENDS)
    assert notes["cuda-graphs-fast-attn"]["mask_given"] is False and notes["cuda-graphs"]["mask_given"] is True
    for note in notes.values():
        (call,) = note["sdpa_calls"]
        assert call["count"] == TINY.layers and call["query"]["dtype"] == "float32"
        assert set(call["verdicts"]) == set(peer_attention.FAST_BACKENDS)
        assert all(v.startswith("not checked: torch's checks judge CUDA tensors") for v in call["verdicts"].values())


def test_the_mask_built_while_capturing_is_recorded_with_its_strides_and_dropped_by_the_fast_peer(
    mask_while_capturing,
):
    model = tiny()
    pattern = scheduled(4, TINY.layers, 0.0, 16)
    ids, mask = make_inputs(pattern, 16, TINY.vocab, 0, "cpu")
    peer_models = PeerModels(model, capture=False)
    with torch.inference_mode():
        fast = peer_models.runner("cuda-graphs-fast-attn", ids, mask)
        masked = peer_models.runner("cuda-graphs", ids, mask)
        eager = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(fast().logits, eager, atol=1e-5) and torch.allclose(masked().logits, eager, atol=1e-5)
    notes = {n["peer"]: n for n in peer_models.notes}
    (call,) = notes["cuda-graphs-fast-attn"]["sdpa_calls"]
    assert call["mask"]["shape"] == [4, 1, 16, 16] and call["mask"]["dtype"] == "bool"
    assert call["mask"]["strides"][-1] == 0 and call["mask"]["strides"][0] == 0  # broadcast, all true
    assert call["dropped"] and notes["cuda-graphs-fast-attn"]["masks_dropped"] == TINY.layers
    assert (
        "strides (0, " in notes["cuda-graphs-fast-attn"]["summary"]
        and "dropped" in notes["cuda-graphs-fast-attn"]["summary"]
    )
    # the peer with its mask: the padding mask made into [B, 1, S, S], kept
    (call,) = notes["cuda-graphs"]["sdpa_calls"]
    assert call["mask"]["shape"] == [4, 1, 16, 16] and call["mask"]["strides"][-1] == 1 and not call["dropped"]
    assert notes["cuda-graphs"]["masks_dropped"] == 0


def test_fast_kernels_that_refuse_the_call_make_a_skipped_row_with_torchs_reasons():
    model = tiny()
    # On the CPU, flash attention has a kernel; memory-efficient and cuDNN attention do not.
    peer_models = PeerModels(model, capture=False, fast_backends=("efficient", "cudnn"))
    rows = measure(model, scheduled(4, TINY.layers, 0.0, 16), peer_models, repeats=1)
    skipped = next(r for r in rows if r["peer"] == "cuda-graphs-fast-attn")
    assert skipped["check"].startswith("skipped: the forward (SDPA held to efficient, cudnn): RuntimeError")
    assert "No viable backend" in skipped["check"] and "SDPA calls: 1 call(s), query (4, 2, 16, 16)" in skipped["check"]
    assert skipped.get("t_p50_s") is None
    assert all(r["check"] == "ok" for r in rows if r is not skipped)  # the peer with its mask ran
    note = next(n for n in peer_models.notes if n["peer"] == "cuda-graphs-fast-attn")
    assert note["refused"] in skipped["check"]


def test_without_cuda_the_captured_peers_are_rehearsed_then_reported_skipped():
    model = tiny()
    peer_models = PeerModels(model)  # capture=None: on CUDA captured, elsewhere rehearsed
    rows = measure(model, scheduled(4, TINY.layers, 0.0, 16), peer_models, repeats=1)
    for peer in GRAPHED:
        row = next(r for r in rows if r["peer"] == peer)
        assert row["check"].startswith(f"skipped: no CUDA device: {peer} is its forward captured in a CUDA graph")
        assert "; rehearsed uncaptured: ran, 4 call(s)" in row["check"]
    assert [n["peer"] for n in peer_models.notes] == list(GRAPHED)
    # a rehearsal the fast kernels refuse says so after the reason the peer is missing
    refusing = PeerModels(model, fast_backends=("efficient", "cudnn"))
    rows = measure(model, scheduled(4, TINY.layers, 0.0, 16), refusing, repeats=1, peers=("cuda-graphs-fast-attn",))
    row = next(r for r in rows if r["peer"] == "cuda-graphs-fast-attn")
    assert row["check"].startswith("skipped: no CUDA device: cuda-graphs-fast-attn")
    assert "; rehearsed uncaptured: the forward (SDPA held to efficient, cudnn): RuntimeError" in row["check"]


def test_torchs_reasons_are_kept_from_cpp_and_python_warnings(monkeypatch):
    """The verdicts on a CUDA call, with torch's checks replaced: a refusal's reasons come from what the
    check writes on file descriptor 2 (C++'s TORCH_WARN) and from Python's warnings, in short."""

    def flash(params, debug):
        os.write(2, b"[W1127 16:03:27.000 sdp_utils.cpp:123] Warning: Flash attention requires attn_mask to be None")
        os.write(2, b" (function operator())\n")
        return False

    def efficient(params, debug):
        warnings.warn("Memory efficient kernel requires attn_mask stride(-1) == 1", UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", flash)
    monkeypatch.setattr(torch.backends.cuda, "can_use_efficient_attention", efficient)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", lambda params, debug: True)
    monkeypatch.setattr(peer_attention, "_params", lambda *args: "params")
    query = SimpleNamespace(device=torch.device("cuda"))
    verdicts = peer_attention.sdpa_verdicts(query, query, query, None)
    assert verdicts == {
        "flash": "refused: Flash attention requires attn_mask to be None",
        "efficient": "refused: Memory efficient kernel requires attn_mask stride(-1) == 1",
        "cudnn": "ok",
    }


def test_kept_warnings_restores_standard_error():
    before = os.fstat(2)
    with pytest.raises(ValueError), peer_attention.kept_warnings() as lines:
        os.write(2, b"kept\n")
        raise ValueError("inside")
    assert lines == ["kept"]
    after = os.fstat(2)
    assert (before.st_ino, before.st_dev) == (after.st_ino, after.st_dev)


@pytest.mark.parametrize("was_on", [True, False])
def test_gc_paused_puts_the_collector_back_also_on_an_exception(was_on):
    (gc.enable if was_on else gc.disable)()
    try:
        with pytest.raises(RuntimeError), timing_controls.gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("a failed configuration")
        assert gc.isenabled() is was_on
    finally:
        gc.enable()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no os.sched_setaffinity here")
def test_the_pin_is_scoped_and_restores_the_affinity_also_on_an_exception():
    before = os.sched_getaffinity(0)
    with timing_controls.pinned() as record:
        assert os.sched_getaffinity(0) == {record["pinned_core"]}
        assert record["affinity_before"] == sorted(before)
        assert record["pinned_core"] in before and (record["pinned_core"] != 0 or len(before) == 1)
    assert os.sched_getaffinity(0) == before
    with pytest.raises(KeyError), timing_controls.pinned(min(before)):
        raise KeyError("inside")
    assert os.sched_getaffinity(0) == before


def test_host_threads_are_put_back():
    before = torch.get_num_threads()
    with pytest.raises(ZeroDivisionError), timing_controls.host_threads(1):
        assert torch.get_num_threads() == 1
        _ = 1 / 0
    assert torch.get_num_threads() == before


def test_a_missing_nvidia_smi_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(timing_controls, "_NVIDIA_SMI_PLACES", ())
    state = timing_controls.gpu_state(which=lambda name: None)
    assert state == {"nvidia_smi": "missing: nvidia-smi is not on PATH (nor in /usr/local/nvidia/bin, /usr/bin)"}

    def broken(*args, **kwargs):
        raise subprocess.TimeoutExpired("nvidia-smi", 20)

    state = timing_controls.gpu_state(run=broken, which=lambda name: "/bin/nvidia-smi")
    assert state["nvidia_smi"].startswith("failed: TimeoutExpired")


def test_nvidia_smis_clocks_are_read_with_the_older_field_name_where_the_newer_is_unknown():
    asked = []

    def fake(command, **kwargs):
        asked.append(command[1])
        if "clocks_event_reasons" in command[1]:
            return SimpleNamespace(returncode=2, stdout="", stderr='Field "clocks_event_reasons.active" is not valid')
        line = "0, NVIDIA H100 80GB HBM3, 1980 MHz, 1980 MHz, 2619 MHz, 0x0000000000000024, 41, 118.20 W\n"
        return SimpleNamespace(returncode=0, stdout=line, stderr="")

    state = timing_controls.gpu_state(run=fake, which=lambda name: "/usr/bin/nvidia-smi")
    assert len(asked) == 2 and "clocks_throttle_reasons.active" in asked[1]
    (gpu,) = state["gpus"]
    assert gpu["clocks.sm"] == "1980 MHz" and gpu["clocks.mem"] == "2619 MHz" and gpu["power.draw"] == "118.20 W"
    assert gpu["temperature.gpu"] == "41"
    assert gpu["clock_event_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]


def test_the_sweep_turns_the_controls_on_with_cuda_and_takes_both_captured_peers_there():
    cuda = sweep.parse_args(["--device", "cuda", "--output-dir", "/tmp/unused"])
    assert cuda.timing_controls is True and cuda.peers == list(GRAPHED)
    cpu = sweep.parse_args(["--device", "cpu", "--output-dir", "/tmp/unused"])
    assert cpu.timing_controls is False and cpu.peers == []
    assert sweep.parse_args(["--device", "cuda", "--no-timing-controls", "--output-dir", "/x"]).timing_controls is False
    assert check_peer_names(["fast-attn", "graphs"]) == list(GRAPHED)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pin is Linux's")
def test_the_sweep_records_the_controls_the_peers_attention_and_the_unpatched_p20_in_meta_json(tmp_path, monkeypatch):
    monkeypatch.setattr(timing_controls, "_nvidia_smi", lambda which: None)
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--size", "tiny", "--seq-lens", "16", "--batch-sizes", "4", "--repeats", "3"]
    argv += ["--models", "bert", "--spot-models", "none", "--patterns", "sched-f0.00", "--peers", ",".join(GRAPHED)]
    argv += ["--timing-controls", "--no-baselines", "--no-memory", "--no-progress", "--output-dir", str(out)]
    assert sweep.main(argv) == 0
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads and gc.isenabled()
    meta = json.loads((out / "meta.json").read_text())
    controls = meta["timing_controls"]
    assert controls["enabled"] and controls["threads"] == 1 and controls["pinned_core"] in affinity
    assert (
        controls["gpu_before"]["nvidia_smi"].startswith("missing") and controls["gpu_after"] == controls["gpu_before"]
    )
    assert [n["peer"] for n in meta["peer_attention"]] == list(GRAPHED)
    assert all(n["model"] == "bert" and n["pattern"] == "sched-f0.00" for n in meta["peer_attention"])
    unpatched = {e["peer"]: e for e in meta["unpatched"]}
    eager = unpatched["eager"]
    assert eager["p20_s"] <= eager["p50_s"] <= eager["p80_s"] and eager["strongest"]
    assert all(unpatched[p]["check"].startswith("skipped: no CUDA device") for p in GRAPHED)
