"""The layer-call overhead benchmark of issue 107 (benchmarks/micro/layer_call_overhead.py) on a tiny classifier whose
layers run on ONNX Runtime int8: at most 1, 8 and 32 rows a call, every layer call's runtime run is counted and timed,
and the rest of the wall time is what the engine spends around them."""

import sys
from pathlib import Path

import pytest
from conftest import word_bert, word_texts

import earlyexit_kernels as eek

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))


def test_each_size_counts_every_runtime_run_and_splits_the_wall_time_around_them(tmp_path):
    for package in ("onnx", "onnxruntime"):
        pytest.importorskip(package, reason=f"{package} is not installed (the int8 extra)")
    import layer_call_overhead

    from earlyexit_kernels.engine.layers.ort_layer import OrtLayer

    model, tokenizer = word_bert(tmp_path, 2, num_hidden_layers=3)
    eek.patch(model, eek.Entropy(0.0))  # nobody exits early: every text runs the 3 layers
    OrtLayer.run_encoder_on(model, int8=True)
    texts = [t or "w1" for t in word_texts(40, seed=4)]
    sizes = layer_call_overhead.measure(model, tokenizer, texts, rounds=2)
    assert list(sizes) == ["1", "8", "32"]
    for size, row in sizes.items():
        assert len(row["calls"]) == len(row["pass_seconds"]) == 2
        # 40 texts x 3 layers, at most `size` rows a call
        assert all(calls >= -(-120 // int(size)) for calls in row["calls"]) and row["rows_per_call"] <= int(size)
        assert all(0 < r <= p for r, p in zip(row["runtime_seconds"], row["pass_seconds"]))
        assert row["runtime_ms_per_call"] > 0 and row["outside_ms_per_call"] >= 0 and 0 <= row["outside_share"] < 1
    assert sizes["1"]["calls"] == [120, 120] and sizes["1"]["rows_per_call"] == 1.0  # one row, one call, per layer


def test_a_model_whose_layers_are_not_on_a_packed_runtime_is_refused(tmp_path):
    import layer_call_overhead

    model, _ = word_bert(tmp_path, 2, num_hidden_layers=2)
    with pytest.raises(SystemExit, match="load it with dtype='int8'"):
        layer_call_overhead.RuntimeClock(model)
