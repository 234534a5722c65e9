"""The int8 layer's op profile (benchmarks/profiles/ort_layer_ops.py) on a tiny classifier: the same texts cut into
calls of a given size, length-sorted or in the file's order, each operator type's time per real token recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _profile(folder: str, texts: Path, output: Path, order: str, scratch: Path) -> dict:
    script = ROOT / "benchmarks" / "profiles" / "ort_layer_ops.py"
    command = [sys.executable, str(script), folder, "--texts", str(texts), "--count", "12", "--rows", "4"]
    command += ["--repeats", "1", "--order", order, "--output", str(output)]
    env = {**os.environ, "TMPDIR": str(scratch)}
    subprocess.run(command, check=True, cwd=ROOT, timeout=240, capture_output=True, env=env)
    return json.loads(output.read_text())


def test_the_profile_counts_every_real_token_and_sorting_pads_less_than_the_file_s_order(saved_classifier, tmp_path):
    for package in ("onnx", "onnxruntime", "pandas"):
        pytest.importorskip(package, reason=f"{package} is not installed (the int8 extra; the texts' .csv)")
    # lengths that alternate long and short: in the file's order every call of 4 pads its short rows
    lines = [" ".join(f"w{j}" for j in range(2 + (i % 2) * 9)) for i in range(12)]
    texts = tmp_path / "texts.csv"
    texts.write_text("text\n" + "".join(f"{line}\n" for line in lines))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    sorted_ = _profile(saved_classifier, texts, tmp_path / "sorted.json", "sorted", scratch)
    in_file = _profile(saved_classifier, texts, tmp_path / "file.json", "file", scratch)
    # the profiler's files are read back and removed, not left in the temp folder
    assert not [path.name for path in scratch.iterdir() if path.name.startswith("eek-")]
    for record in (sorted_, in_file):
        assert (record["rows"], record["count"], record["repeats"]) == (4, 12, 1)
        assert 0 < record["tokens"] <= record["padded_positions"]
        ops = record["ops"]
        assert {"DynamicQuantizeMatMul", "MultiHeadAttention"} <= set(ops)
        assert sum(op["share"] for op in ops.values()) == pytest.approx(1.0)
        assert sum(op["us_per_token"] for op in ops.values()) == pytest.approx(record["us_per_token"])
    assert sorted_["tokens"] == in_file["tokens"]  # the same texts, cut differently
    assert sorted_["padded_positions"] < in_file["padded_positions"]
