"""The layer-cost table (bench/layer_costs.py, engine/graphed/cost_table.py) and the shape ideal's layer timings (bench/ideal.py).

On the CPU the table's calls run eagerly; the GPU's path (each call a CUDA graph replay timed by
CUDA events) shares every line with it but the capture and the clock, whose bookkeeping is checked
here with stand-in events. No time is checked against a threshold: what is held is which layer
calls run, on which shapes, how often, and what the table records.
"""

import collections

import pytest
import torch
from conftest import tiny_model

from earlyexit_kernels.bench import ideal, layer_costs
from earlyexit_kernels.bench.layer_costs import measure_layer_costs, time_round
from earlyexit_kernels.bench.patterns import geometric, padded_geometric
from earlyexit_kernels.engine.graphed.buckets import sizes_from_file, sizes_from_table
from earlyexit_kernels.engine.graphed.cost_table import LayerCostTable
from earlyexit_kernels.models import adapter_class


def counted_adapter(model):
    """The model's adapter, with every ``run_layer`` call counted by (layer, rows, length, masked)."""
    adapter = adapter_class(model)(model, None)
    seen = collections.Counter()
    original = adapter.run_layer

    def run_layer(index, hidden, layer_mask):
        seen[index, hidden.shape[0], hidden.shape[1], layer_mask is not None] += 1
        return original(index, hidden, layer_mask)

    adapter.run_layer = run_layer
    return adapter, seen


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_a_table_runs_the_layer_through_the_adapter_at_every_row_count(padded):
    adapter, seen = counted_adapter(tiny_model("bert"))
    table = measure_layer_costs(
        adapter, [3, 1, 2, 3], 8, device="cpu", dtype=torch.float32, padded=padded, repeats=3, replays=2
    )
    assert table.rows == (1, 2, 3)
    # each count: one warm-up call, then `replays` calls in each of `repeats` rounds, on [n, 8, H]
    assert seen == {(0, n, 8, padded): 1 + 3 * 2 for n in (1, 2, 3)}
    assert all(table.seconds[n] > 0 and table.spread[n] >= 0 for n in table.rows)
    assert (table.seq_len, table.dtype, table.hidden_size, table.padded) == (8, "float32", 32, padded)
    assert (table.captured, table.repeats, table.replays, table.layers) == (False, 3, 2, 1)
    assert table.torch == torch.__version__ and "cores" in table.device and table.model.startswith("bert")


def test_a_family_whose_layers_differ_times_one_period_of_them():
    """ModernBERT-like layer types: a call runs one period (global, sliding, sliding), each on the same input."""
    model = tiny_model("bert")
    model.config.layer_types = ["full", "sliding", "sliding", "full"]
    adapter, seen = counted_adapter(model)
    table = measure_layer_costs(adapter, [2], 4, device="cpu", dtype=torch.float32, repeats=1, replays=1)
    assert table.layers == 3
    assert seen == {(index, 2, 4, False): 2 for index in range(3)}


def test_the_table_saves_and_loads_as_json_unchanged(tmp_path):
    table = LayerCostTable(
        seconds={1: 1e-5, 8: 1.5e-5, 64: 4e-5},
        spread={1: 1e-7, 8: 2e-7, 64: 3e-7},
        seq_len=128,
        device="NVIDIA H100 80GB HBM3",
        dtype="bfloat16",
        torch="2.13.0",
        captured=True,
        repeats=15,
        replays=20,
    )
    path = tmp_path / "costs" / "layer_costs.json"
    table.save(path)
    assert LayerCostTable.load(path) == table
    assert '"1": 1e-05' in path.read_text()  # row counts are JSON's string keys
    assert sizes_from_file(path) == sizes_from_table(table) == (1, 8, 64)


def test_a_table_refuses_a_spread_without_a_time_and_names_the_counts_it_timed():
    with pytest.raises(ValueError, match="spread for every row count"):
        LayerCostTable(seconds={1: 1.0}, spread={2: 0.1}, seq_len=8, device="x", dtype="float32", torch="t")
    table = LayerCostTable(
        seconds={n: 1.0 for n in (1, 2, 3, 8, 16, 17)},
        spread={n: 0.0 for n in (1, 2, 3, 8, 16, 17)},
        seq_len=8,
        device="x",
        dtype="float32",
        torch="t",
    )
    assert table.time(8) == 1.0
    with pytest.raises(KeyError, match="no time at 5 rows; it timed 1-3, 8, 16-17"):
        table.time(5)


class _FakeEvent:
    """A CUDA event on a fake device clock: ``record`` reads it, ``elapsed_time`` is milliseconds."""

    clock = [0.0]  # seconds of device time so far
    made = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        type(self).made += 1
        self.at = None

    def record(self):
        self.at = self.clock[0]

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


def test_on_cuda_events_time_the_replays_after_an_untimed_lead_in(monkeypatch):
    """The GPU's clock: per call, the device time between two events around `replays` calls,
    divided; the lead-in (the first call's replays) is outside every pair of events."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(layer_costs, "synchronize", lambda device: None)
    _FakeEvent.clock[0], _FakeEvent.made = 0.0, 0
    runs = collections.Counter()

    def call(key, seconds):
        def run():
            runs[key] += 1
            _FakeEvent.clock[0] += seconds

        return run

    calls = {1: call(1, 2e-6), 8: call(8, 3e-6), 64: call(64, 7e-6)}
    seconds = time_round(calls, 4, torch.device("cuda"), order=[8, 64, 1])
    assert list(seconds) == [8, 64, 1]
    assert seconds == pytest.approx({1: 2e-6, 8: 3e-6, 64: 7e-6})
    assert runs == {8: 8, 64: 4, 1: 4} and _FakeEvent.made == 6  # the lead-in: 4 more calls of the first
    with pytest.raises(ValueError, match="1 or more"):
        time_round(calls, 0, torch.device("cuda"))


def test_on_the_cpu_the_shape_ideal_times_one_eager_call_per_shape():
    """The CPU's path is the one it had: each shape's probe a plain eager call, timed once a repetition."""
    adapter, seen = counted_adapter(tiny_model("bert"))
    pattern = geometric(8, 4, 6)
    probes = ideal.shape_probes(pattern, 4, 6, adapter, torch.device("cpu"), torch.float32)
    alive = [int((pattern.exit_layers >= layer).sum()) for layer in range(1, 5)]
    assert set(probes) == {(n, 6) for n in alive} and seen == {}
    times = ideal.time_probes(probes, torch.device("cpu"))
    assert set(times) == set(probes) and all(t > 0 for t in times.values())
    assert seen == {(0, n, 6, False): 1 for n in alive}
    ratio = ideal.ideal_shape(pattern, 4, 6, {shape: float(shape[0]) for shape in probes})
    assert ratio == pytest.approx(4 * 8 / sum(alive))  # time proportional to rows: the layer ideal
    assert ratio == pytest.approx(ideal.ideal_layers(pattern, 4))


def test_a_padded_patterns_probes_run_masked_at_their_trimmed_lengths():
    adapter, seen = counted_adapter(tiny_model("bert"))
    pattern = padded_geometric(8, 4, 12)
    probes = ideal.shape_probes(pattern, 4, 12, adapter, torch.device("cpu"), torch.float32)
    ideal.time_probes(probes, torch.device("cpu"))
    assert seen == {(0, n, s, True): 1 for n, s in probes}
    assert (8, 12) in probes and set(probes) == {(8, 12), *ideal.active_shapes(pattern, 4, 12)}


def test_the_benchmark_script_rehearses_on_the_cpu(tmp_path, capsys):
    """``benchmarks/micro/layer_cost_table.py --rehearse``: the tiny model on the CPU writes the table,
    which loads back, and the Markdown with the chosen sizes and a row per B, pattern and plan."""
    from benchmarks.micro import layer_cost_table

    assert layer_cost_table.main(["--rehearse", "--output-dir", str(tmp_path), "--repeats", "2"]) == 0
    table = LayerCostTable.load(tmp_path / "layer_costs.json")
    assert table.rows == tuple(range(1, 17)) and (table.seq_len, table.repeats, table.replays) == (16, 2, 2)
    assert table.notes["sizes_chosen"] == list(sizes_from_table(table))
    text = (tmp_path / "layer_costs.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert f"`sizes_from_table`): {', '.join(map(str, sizes_from_table(table)))} (" in text
    simulated = [line for line in text.splitlines() if line.startswith(("| 8 | ", "| 16 | ")) and "-p0.10" in line]
    simulated += [line for line in text.splitlines() if line.startswith(("| 8 | ", "| 16 | ")) and "sched-f" in line]
    assert len(simulated) == 2 * 2 * 2  # B, pattern, plan
    assert (
        "| 8 | geometric-p0.10" in text and "| 16 | sched-f0.50: every row exits after layer 2 of 4 | chosen |" in text
    )
