"""Online re-certification in every serving path, on the saved tiny classifier made into an ``eek fit`` folder.

The folder's path has three candidates whose risks are known on any text: never exiting early;
every row out at layer 3, whose head always agrees with the full model (0% disagreement); every
row out at layer 1, whose head never does (100%). With a 10% budget at 90%:

- ``eek.classify`` starting from full depth loosens to layer 3 and never to layer 1;
- starting from layer 1 (a folder certified on other traffic) it is pulled back to full depth at
  once, then certified to layer 3 on the rows after the pull-back;
- a real server on 127.0.0.1 does the same, exports it (``eek_policy_*``), writes its audit record,
  and ``eek calibrate FOLDER --from-audit`` writes the served certificate back into the folder;
- Ray Data's class keeps its certificate over the batches it runs.

Off by default where the folder bounds accuracy (labels) or has no certificate; bad input refused.
"""

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import word_texts

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.online import OnlineCertificate, RecertifyError
from earlyexit_kernels.integrations.online_certificate import certificate_of_folder, resolve_online_certificate
from earlyexit_kernels.patching.exit_files import CONFIG_FILE, policy_to_dict

# layer 1's entropies lie near 0.0008, layer 2's near 0.72, layer 3's near 0.67 (conftest's saved_classifier)
FULL_DEPTH = eek.Entropy((0.0, 0.0, 0.0, 0.0))
AT_LAYER_3 = eek.Entropy((0.0, 0.0, 1.0, 0.0))  # agrees with the full model on every row
AT_LAYER_1 = eek.Entropy((1.0, 1.0, 1.0, 0.0))  # disagrees on every row
PATH = [FULL_DEPTH, AT_LAYER_3, AT_LAYER_1]
# every row audited; few read ahead, so that the audit (run as audited rows exit) moves the policy mid-stream
SMALL_STEPS = dict(audit_fraction=1.0, max_batch_size=8, max_in_flight=8, read_ahead=4, admission="fifo")


def certified_folder(source: str, target: Path, start: int, *, target_risk: str = "agreement") -> str:
    """``source`` copied to ``target`` as ``eek fit`` would leave it: serving ``PATH[start]``, certified at 10% / 90%."""
    shutil.copytree(source, target)
    config = json.loads((target / CONFIG_FILE).read_text())
    config["policy"] = policy_to_dict(PATH[start])
    (target / CONFIG_FILE).write_text(json.dumps(config))
    certificate = {"budget": 0.1, "confidence": 0.9, "risk": "disagreement", "rows": 400, "certified": True}
    summary = {"target": target_risk, "certificate": certificate, "certified_path": [p.to_code() for p in PATH]}
    (target / "eek_fit.json").write_text(json.dumps(summary))
    return str(target)


def _texts(count: int, seed: int) -> list[str]:
    return [t or "w0" for t in word_texts(count, seed=seed)]


def test_classify_loosens_to_the_candidate_the_audit_certifies(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=0)
    model, tokenizer = eek.from_pretrained(folder), _tokenizer(folder)
    predictions = eek.classify(model, _texts(200, 1), tokenizer=tokenizer, **SMALL_STEPS)
    layers = [p.exit_layer for p in predictions]
    certificate = predictions.certificate
    assert certificate is not None and certificate.served_policy == AT_LAYER_3
    assert [(m.direction, m.from_index, m.to_index) for m in certificate.moves] == [("looser", 0, 1)]
    assert layers[0] == 4 and layers[-1] == 3 and set(layers) == {3, 4}
    assert predictions.audit.disagreements == 0  # layer 3 agrees with the full model
    assert eek.policy_of(model) == FULL_DEPTH  # the caller's model keeps its policy; the engine moved


def test_classify_pulls_a_threshold_over_the_budget_back_then_certifies_again(saved_classifier, tmp_path):
    folder = certified_folder(saved_classifier, tmp_path / "folder", start=2)
    model, tokenizer = eek.from_pretrained(folder), _tokenizer(folder)
    predictions = eek.classify(model, _texts(300, 2), tokenizer=tokenizer, **SMALL_STEPS)
    layers = [p.exit_layer for p in predictions]
    moves = [(m.direction, m.from_index, m.to_index, m.epoch) for m in predictions.certificate.moves]
    assert moves == [("tighter", 2, 0, 1), ("looser", 0, 1, 2)]
    pulled = predictions.certificate.moves[0]
    assert pulled.risk == 1.0 and pulled.rows < 30  # every audited row disagreed: seen within a few
    assert layers[0] == 1 and layers[-1] == 3 and 4 in layers


def test_the_default_is_on_only_for_a_folder_certified_on_disagreement(saved_classifier, tmp_path):
    agreement = certified_folder(saved_classifier, tmp_path / "agreement", start=0)
    accuracy = certified_folder(saved_classifier, tmp_path / "accuracy", start=0, target_risk="accuracy")
    on, why = resolve_online_certificate(agreement, FULL_DEPTH, None, fraction=0.05)
    assert isinstance(on, OnlineCertificate) and why.startswith("on:") and (on.budget, on.confidence) == (0.1, 0.9)
    off, why = resolve_online_certificate(accuracy, FULL_DEPTH, None, fraction=0.05)
    assert off is None and "accuracy lost" in why
    forced, _ = resolve_online_certificate(accuracy, FULL_DEPTH, True, fraction=0.05)
    assert forced is not None  # asked for: disagreement certified anyway
    assert resolve_online_certificate(agreement, FULL_DEPTH, None, fraction=0.0)[0] is None  # no audit
    assert resolve_online_certificate(agreement, FULL_DEPTH, False, fraction=0.05)[0] is None
    no_certificate, why = resolve_online_certificate(saved_classifier, None, None, fraction=0.05)
    assert no_certificate is None and "no certificate in eek_fit.json" in why
    with pytest.raises(RecertifyError, match="no certificate in eek_fit.json"):
        resolve_online_certificate(saved_classifier, None, True, fraction=0.05)
    with pytest.raises(RecertifyError, match="not on the folder's certified path"):
        resolve_online_certificate(agreement, eek.Entropy(0.3), True, fraction=0.05)

    model, tokenizer = eek.from_pretrained(saved_classifier), _tokenizer(saved_classifier)
    assert eek.classify(model, ["w1"], tokenizer=tokenizer, audit_fraction=1.0).certificate is None
    with pytest.raises(RecertifyError, match="no certificate"):
        eek.classify(model, ["w1"], tokenizer=tokenizer, audit_fraction=1.0, recertify=True)
    with pytest.raises(RecertifyError, match="no audit runs"):
        eek.classify(eek.from_pretrained(agreement), ["w1"], tokenizer=tokenizer, recertify=True)


def test_ray_data_s_class_keeps_its_certificate_over_the_batches(saved_classifier, tmp_path):
    from earlyexit_kernels.integrations.ray_data import EarlyExitClassifier

    folder = certified_folder(saved_classifier, tmp_path / "folder", start=0)
    classify = EarlyExitClassifier(folder, audit_fraction=1.0, max_batch_size=8)
    for seed in range(4):
        classify(pd.DataFrame({"text": _texts(60, 20 + seed)}))
    assert classify.certificate.served_policy == AT_LAYER_3 and classify.certificate.audited == 240
    last = classify(pd.DataFrame({"text": _texts(20, 30)}))
    assert set(last["exit_layer"]) == {3}
    assert EarlyExitClassifier(folder, audit_fraction=1.0, recertify=False).certificate is None


# ------------------------------------------------------------------------------ the server


def _policy_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(eek_policy_\S+) (\S+)$", text, re.MULTILINE)}


def test_a_server_recertifies_exports_its_moves_and_its_record_certifies_the_folder(saved_classifier, tmp_path):
    pytest.importorskip("uvicorn", reason="the server needs uvicorn")
    pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
    httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from served_models import RunningServer

    from earlyexit_kernels.integrations.cli import main
    from earlyexit_kernels.integrations.server import create_app

    folder = certified_folder(saved_classifier, tmp_path / "folder", start=0)
    model, tokenizer = eek.from_pretrained(folder), _tokenizer(folder)
    certificate = certificate_of_folder(folder, fraction=1.0)
    record = tmp_path / "audit.pt"
    app = create_app(
        model, tokenizer, max_batch_size=8, audit_fraction=1.0, recertify=certificate, audit_record=str(record)
    )
    running = RunningServer(app)
    try:
        for seed in range(6):
            running.post("/predict", {"inputs": [[t] for t in _texts(40, 40 + seed)]})
        deadline = time.monotonic() + 60
        while certificate.audited < 240 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = _policy_metrics(running.url)
        assert metrics['eek_policy_moves_total{direction="looser"}'] == 1
        assert metrics['eek_policy_moves_total{direction="tighter"}'] == 0
        assert metrics["eek_policy_candidate"] == 1 and metrics["eek_policy_epoch"] == 1
        assert [metrics[f'eek_policy_threshold{{layer="{k}"}}'] for k in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 0.0]
        assert metrics["eek_policy_disagreement_rate"] == 0.0 and metrics["eek_policy_mean_layers"] == 3.0
        assert metrics["eek_policy_epoch_audited_rows"] == 240 and metrics["eek_policy_budget"] == 0.1
        answered = running.post("/predict", {"inputs": [[t] for t in _texts(10, 50)]}).json()
        assert len(answered) == 10
        info = httpx.get(running.url + "/info", timeout=10).json()
        assert info["recertify"]["served_index"] == 1 and "Entropy((0.0, 0.0, 1.0, 0.0))" in info["policy"]
    finally:
        running.close()
    assert record.is_file()  # written at the latest when the server stopped

    assert main(["calibrate", folder, "--from-audit", str(record)]) == 0
    saved = json.loads((Path(folder) / "eek_fit.json").read_text())
    assert saved["recalibrations"][-1]["source"].startswith("250 audited rows of")
    assert saved["certificate"]["rows"] == 250 and saved["certificate"]["certified"]
    assert eek.policy_of(eek.from_pretrained(folder)) == AT_LAYER_3  # a restart serves what was certified


def test_bad_options_are_refused_in_one_line(saved_classifier, tmp_path, capsys):
    from earlyexit_kernels.integrations.cli import main
    from earlyexit_kernels.integrations.server import create_app

    folder = certified_folder(saved_classifier, tmp_path / "folder", start=0)
    model, tokenizer = eek.from_pretrained(folder), _tokenizer(folder)
    certificate = certificate_of_folder(folder)
    with pytest.raises(ValueError, match="give an audit fraction above 0"):
        create_app(model, tokenizer, recertify=certificate)
    with pytest.raises(ValueError, match="needs re-certification on"):
        create_app(model, tokenizer, audit_fraction=0.5, audit_record=str(tmp_path / "r.pt"))
    source = tmp_path / "in.csv"
    source.write_text("text\nw1 w2\n")
    for arguments, message in [
        (["classify", folder, str(source), str(tmp_path / "o.csv"), "--recertify"], "no audit runs"),
        (
            [
                "classify",
                saved_classifier,
                str(source),
                str(tmp_path / "o.csv"),
                "--audit-fraction",
                "0.5",
                "--recertify",
            ],
            "no certificate in eek_fit.json",
        ),
        (
            ["classify", folder, str(source), str(tmp_path / "o.csv"), "--audit-fraction", "0.5", "--no-recertify"]
            + ["--audit-record", str(tmp_path / "r.pt")],
            "--audit-record records what re-certification replays",
        ),
        (["calibrate", folder], "give FILE (the rows to certify on) or --from-audit RECORD"),
        (["calibrate", folder, "--from-audit", str(source)], "not an audit record written by the server"),
    ]:
        assert main(arguments) == 2, arguments
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error:") and message in error, (arguments, error)


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_record_that_certifies_no_saving_leaves_the_folder_as_it_was_unless_forced(
    saved_classifier, tmp_path, capsys
):
    """eek calibrate --from-audit on rows where every early exit disagrees with the full model: only
    full depth is certified, which saves nothing. The folder keeps its policy, byte for byte, and the
    command says why; --force writes it."""
    import torch

    from earlyexit_kernels.integrations.cli import main

    folder = Path(certified_folder(saved_classifier, tmp_path / "folder", start=1))  # serving AT_LAYER_3
    num_labels = json.loads((folder / "config.json").read_text()).get("num_labels") or len(
        json.loads((folder / "config.json").read_text())["id2label"]
    )
    logits = torch.zeros(4, 300, num_labels)
    logits[:3, :, 0] = 6.0  # layers 1-3: confident in label 0, so every candidate path exits there
    logits[3, :, 1] = 6.0  # the full model: label 1 on every row
    record = tmp_path / "audit.pt"
    payload = {"all_logits": logits, "served": AT_LAYER_3.to_code(), "path": [p.to_code() for p in PATH]}
    torch.save({**payload, "epoch": 1, "multi_label": False}, record)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    assert main(["calibrate", str(folder), "--from-audit", str(record)]) == 0
    out = capsys.readouterr().out
    assert "not written:" in out and "keeps its policy" in out and "--force" in out and "rewrote" not in out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert eek.policy_of(eek.from_pretrained(folder)) == AT_LAYER_3

    assert main(["calibrate", str(folder), "--from-audit", str(record), "--force"]) == 0
    assert "rewrote" in capsys.readouterr().out
    assert eek.policy_of(eek.from_pretrained(folder)) == FULL_DEPTH
