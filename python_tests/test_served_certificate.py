"""``eek serve FOLDER --dtype int8 --calibration FILE`` (issue 63): the threshold certified at start-up on
the base served, as ``eek calibrate COPY FILE --dtype int8`` certifies it, the folder on disk unchanged.

The folder (``test_recertify_serving.certified_folder``) serves the candidate that exits every row at
layer 1, whose head never agrees with the full model: no certificate keeps it, so a server that
serves anything else has certified on its rows.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import word_texts
from test_recertify_serving import AT_LAYER_1, certified_folder

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main


def _rows(tmp_path) -> str:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "rows.csv"
    pd.DataFrame({"text": [t or "w0" for t in word_texts(400, seed=21)]}).to_csv(path, index=False)
    return str(path)


def _snapshot(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_certifies_on_the_int8_base_as_eek_calibrate_does_and_leaves_the_folder(saved_classifier, tmp_path):
    pytest.importorskip("uvicorn", reason="the server needs uvicorn")
    pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
    httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=2)
    rows = _rows(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert main(["calibrate", str(copy), rows, "--dtype", "int8", "--no-progress"]) == 0
    expected = eek.policy_of(eek.from_pretrained(str(copy)))
    assert expected != AT_LAYER_1  # the saved threshold is not what a certificate keeps
    before = _snapshot(folder)

    port = _free_port()
    command = [sys.executable, "-m", "earlyexit_kernels", "serve", folder, "--port", str(port), "--dtype", "int8"]
    command += ["--calibration", rows, "--audit-fraction", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, info = time.monotonic() + 120, None
        while info is None and time.monotonic() < deadline and process.poll() is None:
            try:
                info = httpx.get(url + "/info", timeout=1).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert info is not None, "the server did not start: " + (
            process.communicate(timeout=5)[0].decode()[-3000:] if process.poll() is not None else ""
        )
        assert info["policy"] == repr(expected)
        assert httpx.post(url + "/predict", json={"inputs": "w1 w2"}, timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            log = process.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            log = process.communicate()[0].decode()
    assert f"certified at start-up on {rows}, on the int8 base served:" in log
    assert "calibrated on 400 rows (agreement with the full model)" in log
    assert "certified on float32" not in log  # no warning: it is certified here
    assert f"the certificate of --calibration {rows}: disagreement <= 10%" in log  # the audit watches this one
    assert _snapshot(folder) == before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--policy", "Entropy(0.1)"], "error: --calibration certifies the folder's threshold at start-up and cannot"),
        (["--recertify"], "error: --calibration certifies the folder's threshold at start-up and cannot"),
        (["--replicas", "2"], "error: --calibration certifies the folder's threshold at start-up and cannot"),
    ],
)
def test_what_cannot_go_with_a_start_up_certificate_is_refused_in_one_line(
    saved_classifier, tmp_path, capsys, arguments, message
):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=2)
    assert main(["serve", folder, "--calibration", _rows(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_rows_too_few_for_the_budget_are_refused_saying_how_many_would_do(saved_classifier, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=2)
    few = tmp_path / "few.csv"
    pd.DataFrame({"text": ["w1 w2", "w3"]}).to_csv(few, index=False)
    assert main(["serve", folder, "--dtype", "int8", "--calibration", str(few)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --calibration {few}:") and err.count("\n") == 1, err
