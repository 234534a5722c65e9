"""The stream benchmark (earlyexit_kernels/bench/stream.py) end to end at a tiny size.

(e), compile=True, is left out here (its first compile alone takes ~20 s on 2 cores); that a
compiled stream compiles nothing after its warm-up is python_tests/test_classify.py's.
"""

import csv

import torch

from earlyexit_kernels.bench import stream
from earlyexit_kernels.bench.stream import COLUMNS, StreamConfig, run, stream_lengths


def test_the_stream_benchmark_writes_its_csv_table_and_plot(tmp_path):
    config = StreamConfig(
        sequences=160,
        hidden=32,
        layers=4,
        heads=2,
        max_batch_size=16,
        repeats=1,
        saved=(0.5, 0.0),
        compile=False,
        threads=1,
    )
    rows = run(config, tmp_path, name="stream_test", progress=lambda message: None)
    with open(tmp_path / "stream_test.csv") as file:
        written = list(csv.DictReader(file))
    assert list(written[0]) == COLUMNS
    assert len(written) == len(rows) == 4 + 3  # (a)-(d) on the main policy, (b)-(d) on the other
    main = {r["method"][:3]: r for r in written if r["target_saved"] == "0.5"}
    assert set(main) == {"(a)", "(b)", "(c)", "(d)"}
    d, c = main["(d)"], main["(c)"]
    # (d)'s predictions equal (c)'s: the same exit layers, logits within rounding.
    assert int(d["exit_mismatches_vs_c"]) == 0 and float(d["max_logit_diff_vs_c"]) < 1e-4
    assert 0.0 < float(d["fill"]) <= 1.0 and 0.0 < float(c["fill"]) <= 1.0
    assert float(d["host_syncs_per_call"]) <= 1.0
    assert float(d["seq_per_s"]) > 0 and float(d["ideal_seq_per_s"]) > 0
    assert 0.2 < float(d["saved_layer_share"]) < 0.8  # the calibration aims at 0.5
    assert len([n for n in d["exit_histogram"].split("/") if int(n) > 0]) >= 3  # exits spread over the layers
    table = (tmp_path / "stream_test.md").read_text()
    assert "| (d) eek.classify |" in table and "Targets" in table
    assert stream.markdown(tmp_path / "stream_test.csv") in table + "\n" or table.startswith(
        stream.markdown(tmp_path / "stream_test.csv").split("\nCommand")[0]
    )
    assert (tmp_path / "stream_test.png").stat().st_size > 0


def test_the_lengths_look_like_sentence_classification_data():
    lengths = stream_lengths(20000, seed=0)
    share = sum(10 <= n <= 60 for n in lengths) / len(lengths)
    assert 0.85 < share < 0.93  # the docstring says about 89%
    assert max(lengths) <= 256 and min(lengths) >= 4
    assert sum(n > 128 for n in lengths) > 0  # a tail


def test_the_calibration_hits_its_target_share():
    entropies = torch.rand(500, 5)
    for saved in (0.25, 0.5):
        threshold = stream.calibrate(entropies, saved)
        layers = stream.exit_layers_at(entropies, threshold)
        assert abs((1 - layers.float().mean().item() / 6) - saved) < 0.02
    assert stream.calibrate(entropies, 0.0) == 0.0
