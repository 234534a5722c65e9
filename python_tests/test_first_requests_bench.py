"""The first-requests benchmark (benchmarks/profiles/first_requests.py) on a tiny served classifier: each round
starts ``eek serve`` as installed, whose start-up prepares every runtime layer's session and says so, and the same
server with that preparation left out, which says nothing of it; both answer the same requests one at a time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_both_servers_answer_every_request_and_only_the_installed_one_prepares_its_layers(saved_classifier, tmp_path):
    for package, why in [("onnx", "the int8 extra"), ("onnxruntime", "the int8 extra"), ("starlette", "the serve extra"),
                         ("uvicorn", "the serve extra"), ("httpx", "the benchmark's client")]:  # fmt: skip
        pytest.importorskip(package, reason=f"{package} is not installed ({why})")
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(10)))
    output = tmp_path / "first.json"
    script = ROOT / "benchmarks" / "profiles" / "first_requests.py"
    command = [sys.executable, str(script), saved_classifier, str(texts), "--requests", "9", "--rounds", "1"]
    subprocess.run([*command, "--output", str(output)], check=True, cwd=ROOT, timeout=240)
    result = json.loads(output.read_text())
    prepared, unprepared = (result["rounds"][s][0] for s in ("prepared at start-up", "sessions at first call"))
    for row in (prepared, unprepared):
        assert len(row["request_ms"]) == len(row["layer_ms"]) == 9 and row["ready_s"] > 0
        assert row["first_ms"] == row["request_ms"][0] and row["slowest_of_first_ms"] == max(row["request_ms"][:8])
    # the folder's float32 layers are served on ONNX Runtime (eek serve's --layers auto): 4 sessions to make
    assert prepared["start_up_line"].startswith("layers: 4 runtime sessions made at start-up in ")
    assert unprepared["start_up_line"] is None
    assert set(result["medians"]) == {"prepared at start-up", "sessions at first call"}
