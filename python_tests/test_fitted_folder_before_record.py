"""A folder ``eek fit`` wrote before ``eek_fit.json`` had a record class still loads and serves unchanged.

``python_tests/data/fitted_before_record/`` was fitted by the code of commit 9d5811d (2026-11-26): a
random BERT (hidden 16, 3 layers, 2 labels, ``initializer_range`` 0.3) fitted by ``eek fit`` on 200
labelled rows of ``conftest.word_texts`` (seed 22), certified on 700 unlabelled ones (seed 23,
``--max-drop 5 --epochs 4``), then re-certified once by ``eek calibrate --force`` on 700 more (seed 24),
so its ``eek_fit.json`` holds a certificate, a certified path and a ``recalibrations`` entry.
``fitted_before_record_classified.json`` holds what that code's :func:`earlyexit_kernels.classify`
returned on 40 of the seed-24 rows: each row's exit layer and logits (6 decimals).
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.model_folder import audit_settings, certified_base, fit_certificate
from earlyexit_kernels.integrations.online_certificate import certificate_of_folder
from earlyexit_kernels.integrations.recertify_folder import saved_budget, saved_path

FOLDER = Path(__file__).parent / "data" / "fitted_before_record"
CLASSIFIED = Path(__file__).parent / "data" / "fitted_before_record_classified.json"


def test_the_folder_classifies_as_it_did_when_fitted():
    expected = json.loads(CLASSIFIED.read_text())
    model = eek.from_pretrained(str(FOLDER))
    tokenizer = AutoTokenizer.from_pretrained(str(FOLDER))
    assert eek.policy_of(model).to_code(4) == "Entropy(0.5867)"
    predictions = list(eek.classify(model, expected["texts"], tokenizer=tokenizer))
    assert [p.exit_layer for p in predictions] == expected["exit_layer"]
    got = torch.stack([p.logits.float() for p in predictions])
    torch.testing.assert_close(got, torch.tensor(expected["logits"]), rtol=0, atol=2e-5)


def test_its_certificate_path_and_base_read_as_saved():
    certificate = fit_certificate(str(FOLDER))
    assert certificate["target"] == "agreement" and (certificate["budget"], certificate["confidence"]) == (0.05, 0.95)
    assert certificate["rows"] == 700 and certificate["certified"] is True
    assert saved_budget(str(FOLDER)) == (5.0, 0.95)
    path = saved_path(str(FOLDER))
    assert len(path) == 401 and path[0] == eek.Entropy(0.0)
    assert certified_base(str(FOLDER)) == "float32"  # "as saved" by eek calibrate: eek fit's float32
    budget, confidence, source = audit_settings(str(FOLDER))
    assert (budget, confidence) == (0.05, 0.95) and "eek_fit.json" in source


def test_its_online_certificate_starts_at_the_served_policy():
    online = certificate_of_folder(str(FOLDER))
    assert online.path == saved_path(str(FOLDER))
    assert online.path[online.start] == eek.policy_of(eek.from_pretrained(str(FOLDER)))
