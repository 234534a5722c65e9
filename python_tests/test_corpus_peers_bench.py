"""The corpus benchmark of issue 107 (benchmarks.suite.corpus_peers) on a tiny early-exit folder and its plain
classifier: every configuration's rounds, its first pass timed apart (what a corpus classified once takes), the
peers' speed-ups paired within each round, and the agreement with the float32 plain model."""

import json

import pytest
from conftest import word_bert, word_texts

import earlyexit_kernels as eek

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),  # the script sets torch's threads: given back after the module
]


def test_each_row_has_its_rounds_its_first_pass_and_the_paired_speed_ups(tmp_path):
    for package in ("onnx", "onnxruntime"):
        pytest.importorskip(package, reason=f"{package} is not installed (the int8 extra)")
    from benchmarks.suite import corpus_peers

    plain, patched = tmp_path / "plain", tmp_path / "model"
    plain.mkdir()
    model, tokenizer = word_bert(plain, 2)
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    eek.patch(model, eek.Entropy(0.0))
    model.save_pretrained(patched)
    tokenizer.save_pretrained(patched)
    texts, calibration, out = tmp_path / "texts.txt", tmp_path / "calibration.txt", tmp_path / "corpus.json"
    texts.write_text("\n".join(t or "w1" for t in word_texts(20, seed=4)) + "\n")
    calibration.write_text("\n".join(t or "w2" for t in word_texts(16, seed=9)) + "\n")
    argv = [str(patched), str(plain), "--texts", str(texts), "--calibration", str(calibration), "--batch", "8"]
    assert corpus_peers.main([*argv, "--rounds", "2", "--also-engine", "cohorts", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["texts"] == 20 and result["rounds"] == 2
    rows = {row["name"]: row for row in result["rows"]}
    mine = rows[corpus_peers.EEK]
    assert "ONNX Runtime int8" in rows  # the peer every install of the int8 extra has
    for row in rows.values():
        assert len(row["texts_per_s"]) == 2 and row["first_pass_texts_per_s"] > 0
        assert 0 <= row["agreement_with_fp32"] <= 1
    peer = rows["ONNX Runtime int8"]
    assert peer["eek_speedup_per_round"] == pytest.approx(
        [m / p for m, p in zip(mine["texts_per_s"], peer["texts_per_s"])]  # peer's seconds over eek's, per round
    )
    cohorts = f"{corpus_peers.EEK} (engine cohorts)"  # the folder again on another stream engine, paired alike
    assert rows[cohorts]["agreement_with_fp32"] == mine["agreement_with_fp32"]  # Entropy(0): every row at depth
    assert peer["also_speedup_per_round"][cohorts] == pytest.approx(
        [m / p for m, p in zip(rows[cohorts]["texts_per_s"], peer["texts_per_s"])]
    )
