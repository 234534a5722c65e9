"""The per-layer benchmark of issue 107 (benchmarks/micro/ort_layer_per_layer.py) on a tiny saved classifier: the
peer's layer is the difference of its two depths, eek's the layers' time over their count, each ratio paired
within its round; an MPNet classifier's layers take its encoder's position bias; a one-layer classifier, which
has no difference to take, is refused."""

import json
import sys
from pathlib import Path

import pytest
from conftest import SPECIAL, WORDS, tiny_mpnet, word_bert, word_texts, word_vocab

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),  # the script sets torch's threads: given back after the module
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))


def saved(folder: Path, layers: int) -> Path:
    folder.mkdir()
    model, tokenizer = word_bert(folder, 2, num_hidden_layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_script(folder: Path, count: int, rounds: int, seed: int, *extra: str) -> dict:
    """The script on ``count`` word texts of ``folder``'s vocabulary in batches of 8 (``extra``: more options): its
    JSON."""
    for package in ("onnx", "onnxruntime"):
        pytest.importorskip(package, reason=f"{package} is not installed (the int8 extra)")
    import ort_layer_per_layer

    texts, out = folder.parent / "texts.txt", folder.parent / "per_layer.json"
    texts.write_text("\n".join(t or "w1" for t in word_texts(count, seed=seed)) + "\n")
    argv = [str(folder), "--texts", str(texts), "--count", str(count), "--batch", "8", "--rounds", str(rounds)]
    assert ort_layer_per_layer.main([*argv, *extra, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_each_round_pairs_the_peers_layer_with_eeks_and_records_every_pass(tmp_path):
    result = run_script(saved(tmp_path / "model", layers=3), count=24, rounds=2, seed=2)
    assert result["layers"] == 3 and result["texts"] == 24 and result["batch"] == 8
    passes = result["pass_seconds"]
    full, one, eek, whole = passes.values()
    assert all(len(v) == 2 and min(v) > 0 for v in passes.values())
    peer = [(a - b) / 2 for a, b in zip(full, one)]  # (T_3 - T_1) / (3 - 1)
    assert result["ms_per_layer"]["peer"] == [round(t * 1e3, 2) for t in peer]
    assert result["ms_per_layer"]["eek"] == [round(t / 3 * 1e3, 2) for t in eek]
    assert result["ratio_per_round"] == [round(p / (t / 3), 4) for p, t in zip(peer, eek)]
    assert result["whole_model_ratio_per_round"] == [round(a / b, 4) for a, b in zip(full, whole)]
    assert "quantize_dynamic" in result["peer"] and result["command"].startswith("benchmarks/micro/")


def test_a_one_layer_classifier_is_refused_with_the_reason(tmp_path):
    import ort_layer_per_layer

    folder = saved(tmp_path / "model", layers=1)
    texts = tmp_path / "texts.txt"
    texts.write_text("w1 w2\n" * 8)
    with pytest.raises(SystemExit, match="difference of two depths"):
        ort_layer_per_layer.main([str(folder), "--texts", str(texts), "--count", "8", "--batch", "8",
                                  "--output", str(tmp_path / "x.json")])  # fmt: skip


def saved_mpnet(folder: Path, layers: int) -> Path:
    """A tiny random MPNet classifier over the word vocabulary, its [PAD] (id 0) MPNet's padding index."""
    from transformers import BertTokenizerFast

    folder.mkdir()
    vocab = word_vocab(folder)
    model = tiny_mpnet(layers, vocab_size=len(SPECIAL) + len(WORDS), max_position_embeddings=66, pad_token_id=0)
    model.save_pretrained(folder)
    BertTokenizerFast(vocab=str(vocab), model_max_length=64).save_pretrained(folder)
    return folder


def test_an_mpnet_classifier_runs_its_layers_with_the_encoders_position_bias(tmp_path):
    # without the bias, the MPNet layer refuses the call ("takes the position bias its encoder computes")
    result = run_script(saved_mpnet(tmp_path / "mpnet", layers=3), count=16, rounds=1, seed=3)
    assert result["layers"] == 3 and len(result["ratio_per_round"]) == 1
    # the peer's layer is a difference of two passes (T_3 - T_1) / 2: on a 3-layer toy model at 16 texts its
    # sign is noise, so the test checks how the ratio is made, never its value
    full, one, eek, _ = result["pass_seconds"].values()
    assert all(min(v) > 0 for v in result["pass_seconds"].values())
    assert result["ms_per_layer"]["eek"] == [round(t / 3 * 1e3, 2) for t in eek]  # all 3 layers ran
    peer = [(a - b) / 2 for a, b in zip(full, one)]
    assert result["ratio_per_round"] == [round(p / (t / 3), 4) for p, t in zip(peer, eek)]


def test_the_static_layers_are_read_against_openvino_s_static_int8_whole_model(tmp_path):
    from earlyexit_kernels.engine.layers.ov_static import STATIC_MISSING, static_available

    if not static_available():
        pytest.skip(STATIC_MISSING)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(t or "w2" for t in word_texts(16, seed=9)) + "\n")
    extra = ("--recipe", "static-ov", "--calibration", str(calibration))
    result = run_script(saved(tmp_path / "model", layers=3), 16, 1, 4, *extra)
    assert result["recipe"] == "static-ov" and "OpenVINO int8" in result["what"]
    assert list(result["pass_seconds"])[2] == "eek static-ov layers" and "nncf" in result["peer"]
    # the same layers in one call a batch, as the early-exit forward runs them, every row at full depth
    assert list(result["pass_seconds"])[4].startswith("eek static-ov layers in one call")
    assert len(result["exit_graph_ratio_per_round"]) == 1 and result["exit_graph_ratio_median"] > 0
    assert all(t > 0 for t in result["ms_per_layer"]["eek_exit_graph"])
    setting = result["exit_graph_setting"]  # compiled as eek fit compiles it, and read even where the fit's race
    assert setting.startswith("the exit graph: ") or (  # would run the layers one call each
        setting.startswith("no exit graph: ")
        and setting.endswith("read here all the same: the exit graph at the layers' settings")
    )
