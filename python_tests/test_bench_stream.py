"""The stream benchmark runs end to end at a tiny size; (d) must agree with (c) on every exit (checked inside)."""

import csv

from earlyexit_kernels.bench.stream import StreamConfig, run, stream_lengths


def test_the_stream_benchmark_writes_its_table(tmp_path):
    config = StreamConfig(sequences=96, hidden=32, layers=3, heads=2, repeats=1, quantiles=(0.3, 0.5), compile=False)
    rows = run(config, tmp_path, progress=lambda message: None)
    with open(tmp_path / "stream.csv") as file:
        written = list(csv.DictReader(file))
    assert len(written) == len(rows) == 4 + 3  # (a)-(d) on the main policy, (b)-(d) on the other
    assert {"method", "seq_per_s", "ideal_seq_per_s", "of_ideal", "fill", "host_syncs_per_call"} <= set(written[0])
    streamed = next(r for r in written if r["method"] == "(d) eek.classify")
    assert float(streamed["host_syncs_per_call"]) <= 1.0
    assert "| (d) eek.classify |" in (tmp_path / "stream.md").read_text()


def test_the_lengths_look_like_sentence_classification_data():
    lengths = stream_lengths(20000, seed=0)
    share = sum(10 <= n <= 60 for n in lengths) / len(lengths)
    assert 0.85 < share < 0.93  # the docstring says about 89%
    assert max(lengths) <= 256 and min(lengths) >= 4
