"""The compiled-models benchmark of issue 107 (benchmarks/micro/ov_compiled_models.py) on a tiny saved classifier:
one static int8 layer's compiled model called L times a batch, L compiled models of that layer and the L layers' own,
every pass recorded and each ratio paired within its round."""

import json
import sys
from pathlib import Path

import pytest
from conftest import word_bert, word_texts

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),  # the script sets torch's threads: given back after the module
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))


def test_the_three_ways_to_call_the_layers_are_timed_in_the_same_rounds(tmp_path):
    from earlyexit_kernels.engine.layers.ov_static import STATIC_MISSING, static_available

    if not static_available():
        pytest.skip(STATIC_MISSING)
    import ov_compiled_models

    folder = tmp_path / "model"
    folder.mkdir()
    model, tokenizer = word_bert(folder, 2, num_hidden_layers=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts, calibration, out = tmp_path / "texts.txt", tmp_path / "calibration.txt", tmp_path / "result.json"
    texts.write_text("\n".join(t or "w1" for t in word_texts(16, seed=3)) + "\n")
    calibration.write_text("\n".join(t or "w2" for t in word_texts(16, seed=9)) + "\n")
    argv = [str(folder), "--texts", str(texts), "--calibration", str(calibration), "--count", "16", "--batch", "8"]
    assert ov_compiled_models.main([*argv, "--rounds", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == 3 and result["texts"] == 16 and result["batch"] == 8
    one, copies, layers = (result["pass_seconds"][name] for name in ov_compiled_models.NAMES)
    assert all(len(v) == 2 and min(v) > 0 for v in (one, copies, layers))
    assert result["ratio_per_round"] == {
        f"{ov_compiled_models.COPIES} / {ov_compiled_models.ONE}": [round(a / b, 4) for a, b in zip(copies, one)],
        f"{ov_compiled_models.LAYERS} / {ov_compiled_models.ONE}": [round(a / b, 4) for a, b in zip(layers, one)],
    }
    assert result["command"].startswith("benchmarks/micro/ov_compiled_models.py")
