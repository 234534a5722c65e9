"""The audit watch: a random fraction of the sequences also runs the full model, and their disagreement is watched.

The watch's counts and bound against ``methods/risk_control`` (the bound calibration certifies
with); its warning, once per crossing, on constructed streams; its seeded choice; the full
model's logits against the unpatched copy; ``eek.classify(audit_fraction=)``, Ray Data's class
and a real server on 127.0.0.1 with ``audit_fraction=1.0``, whose answers are those of a server
without audit; bad fractions refused, in Python and on the command line.
"""

import copy
import json
import logging
import math
import random
import re
import time

import pytest
import torch
from conftest import VOCAB, tiny_model, word_texts

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.row_losses import accuracy_lost, disagreement, paired_loss
from earlyexit_kernels.engine.entry import audit as audit_module
from earlyexit_kernels.engine.entry.audit import AuditWatch, full_depth_logits
from earlyexit_kernels.methods import risk_control

LOGGER = "earlyexit_kernels.audit"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


# ------------------------------------------------------------------------------ the bound and the counts


def test_the_watch_bounds_with_calibration_s_own_function():
    assert audit_module.upper_bound is risk_control.upper_bound  # one home for the statistics


def test_the_watch_counts_and_bounds_as_risk_control():
    watch = AuditWatch(1.0, confidence=0.9)
    assert (watch.audited, watch.disagreements, watch.rate, watch.bound()) == (0, 0.0, None, 1.0)
    stream = [1.0 if i % 7 == 0 else 0.0 for i in range(200)]
    for start in range(0, 200, 16):
        watch.record(stream[start : start + 16], seconds=0.5)
    assert watch.audited == 200 and watch.disagreements == sum(stream) == 29
    assert watch.rate == pytest.approx(29 / 200)
    assert watch.binary
    assert watch.bound() == risk_control.upper_bound(29, 200, 0.9)
    assert watch.full_seconds == pytest.approx(0.5 * 13)
    assert watch.budget is None and watch.within_budget is None and watch.over_budget is None
    summary = watch.as_dict()
    assert summary["audited"] == 200 and summary["bound"] == watch.bound() and summary["budget"] is None

    # a fraction (multi-label): Hoeffding-Bentkus, as calibration uses on such losses
    watch.record([0.25, 0.5])
    assert not watch.binary
    assert watch.bound() == risk_control.upper_bound(29.75, 202, 0.9, binary=False)


@pytest.mark.parametrize("binary", [True, False])
def test_within_and_over_the_budget_are_the_upper_and_lower_bounds_against_it(binary):
    budget, confidence = 0.05, 0.95
    for n in (10, 60, 200, 1000):
        for k in range(0 if binary else 1, n // 4 + 1, max(1, n // 40)):
            losses = float(k) if binary else 0.8 * k
            watch = AuditWatch(1.0, budget=budget, confidence=confidence)
            logging.getLogger(LOGGER).disabled = True
            try:
                watch.record([losses / n] * n if not binary else [1.0] * k + [0.0] * (n - k))
            finally:
                logging.getLogger(LOGGER).disabled = False
            upper = risk_control.upper_bound(losses, n, confidence, binary=binary)
            # the lower bound: one minus the upper bound of one minus the loss
            lower = 1.0 - risk_control.upper_bound(n - losses, n, confidence, binary=binary)
            if abs(upper - budget) > 1e-9:
                assert watch.within_budget == (upper <= budget), (n, k)
            if abs(lower - budget) > 1e-9:
                assert watch.over_budget == (lower > budget), (n, k)


def test_the_losses_are_the_calibrations_agreement():
    early = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.5, 0.0]])
    full = torch.tensor([[2.0, 1.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    assert disagreement(early, full).tolist() == [0.0, 1.0, 1.0]
    assert disagreement(early - 0.5, full - 0.5, multi_label=True).tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    one = torch.tensor([[0.3], [-1.0], [2.0]])
    assert disagreement(one, torch.tensor([[0.1], [0.5], [-2.0]])).tolist() == [0.0, 1.0, 1.0]
    # the paired accuracy loss the watch counts with labels is the certificate's "accuracy" loss, row for row
    labels = torch.tensor([0, 1, 2])
    lost = accuracy_lost(early, full, labels).tolist()
    assert lost == [0.0, -1.0, 1.0]
    assert [
        paired_loss(int(e) == int(y), int(f) == int(y)) for e, f, y in zip(early.argmax(-1), full.argmax(-1), labels)
    ] == lost
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        AuditWatch(1.0).record([1.5])


# ------------------------------------------------------------------------------ the warning


def test_the_warning_fires_once_when_the_disagreements_pass_the_budget(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    watch = AuditWatch(1.0, budget=0.01, confidence=0.95)
    watch.record([0.0] * 400)  # certified: the bound under 1%
    assert watch.bound() < 0.01 and watch.within_budget and not _warnings(caplog)
    for _ in range(20):  # then one in ten disagrees: the budget is passed, said once
        watch.record([1.0] + [0.0] * 9)
    warned = _warnings(caplog)
    assert len(warned) == 1 and watch.warnings == 1 and watch.over_budget
    assert "budget of 1%" in warned[0]
    rate = re.search(r"of (\d+) audited sequences \(([\d.]+)%\), upper 95% bound ([\d.]+)%", warned[0])
    assert rate, warned[0]
    n = int(rate.group(1))
    assert float(rate.group(3)) > 1.0
    # the numbers are the watch's at that moment
    assert float(rate.group(3)) == pytest.approx(
        100 * risk_control.upper_bound(float(n - 400) / 10, n, 0.95), abs=0.006
    )

    # back under (many agreeing sequences): an info line; a new shift warns again
    watch.record([0.0] * 40000)
    assert watch.within_budget and any("back within the budget" in m for m in _infos(caplog))
    for _ in range(200):
        watch.record([1.0] * 5 + [0.0] * 5)
    assert len(_warnings(caplog)) == 2 and watch.warnings == 2


def test_no_warning_when_the_disagreement_stays_under_or_the_rows_are_too_few(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    rng = random.Random(0)
    watch = AuditWatch(1.0, budget=0.01, confidence=0.95)
    for _ in range(300):  # half the budget: the bound goes under it and stays near it
        watch.record([1.0 if rng.random() < 0.005 else 0.0 for _ in range(16)])
    assert watch.within_budget
    # few rows: the upper bound is above the budget for lack of them, which is not a warning
    few = AuditWatch(1.0, budget=0.01)
    few.record([0.0] * 50 + [1.0])
    assert few.bound() > 0.01 and not few.within_budget and not few.over_budget
    assert not _warnings(caplog) and watch.warnings == few.warnings == 0
    # without a budget: counts and bounds, never warns
    free = AuditWatch(1.0)
    free.record([1.0] * 100)
    assert free.bound() == 1.0 and free.over_budget is None and not _warnings(caplog)


def test_a_disagreement_over_the_budget_from_the_start_warns_too(caplog):
    watch = AuditWatch(1.0, budget=0.01, confidence=0.95)
    watch.record([1.0] * 3 + [0.0] * 13)  # 3 of 16 at a 1% budget: shown over at once
    assert watch.over_budget and len(_warnings(caplog)) == 1


# ------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_a_bad_fraction_is_refused_saying_what_a_good_one_is(fraction):
    with pytest.raises(ValueError, match=r"audit fraction must be a number in \[0, 1\]"):
        AuditWatch(fraction)


def test_bad_budgets_and_confidences_are_refused():
    with pytest.raises(ValueError, match="audit budget"):
        AuditWatch(0.5, budget=1.0)
    with pytest.raises(ValueError, match="audit confidence"):
        AuditWatch(0.5, confidence=1.0)


def test_the_choice_is_seeded_and_about_the_fraction():
    watch = AuditWatch(0.5, seed=3)
    chosen = [watch.choose() for _ in range(1000)]
    expected = random.Random(3)
    assert chosen == [expected.random() < 0.5 for _ in range(1000)]
    assert 450 <= sum(chosen) <= 550
    assert not any(AuditWatch(0.0).choose() for _ in range(100))
    assert all(AuditWatch(1.0).choose() for _ in range(100))


# ------------------------------------------------------------------------------ the full model


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_full_model_is_the_unpatched_model_on_the_same_weights(arch):
    model = tiny_model(arch, num_layers=3)
    eek.patch(model, eek.Entropy(0.3))
    unpatched = eek.unpatch(copy.deepcopy(model))
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for length in (3, 17, 9, 30, 5, 12):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        types = [0] * (length // 2) + [1] * (length - length // 2) if arch == "bert" else None
        sequences.append((ids, types))
    got = full_depth_logits(model, sequences, max_batch_size=4, max_tokens=60)
    with torch.no_grad():
        for (ids, types), row in zip(sequences, got, strict=True):
            kwargs = {} if types is None else {"token_type_ids": torch.tensor([types])}
            alone = unpatched(input_ids=torch.tensor([ids]), **kwargs).logits[0]
            assert torch.allclose(row, alone, atol=1e-5)
    assert eek.is_patched(model)  # untouched


# ------------------------------------------------------------------------------ eek.classify


@pytest.fixture(scope="module")
def patched(saved_classifier):
    from earlyexit_kernels.integrations.model_folder import load_model

    return load_model(saved_classifier)


def _full_classes(model, tokenizer, texts):
    unpatched = eek.unpatch(copy.deepcopy(model))
    with torch.no_grad():
        return [int(unpatched(**tokenizer(t, return_tensors="pt")).logits[0].argmax()) for t in texts]


def test_classify_audits_the_seeded_half_and_answers_as_without(patched):
    model, tokenizer = patched
    texts = [t or "w0" for t in word_texts(200, seed=5)]
    plain = eek.classify(model, texts, tokenizer=tokenizer, max_batch_size=16)
    assert plain.audit is None
    plain = list(plain)
    predictions = eek.classify(model, texts, tokenizer=tokenizer, max_batch_size=16, audit_fraction=0.5)
    audited = list(predictions)
    watch = predictions.audit

    for a, b in zip(plain, audited, strict=True):
        assert (a.index, a.exit_layer, a.layers_run) == (b.index, b.exit_layer, b.layers_run)
        assert torch.equal(a.logits, b.logits)
        assert a.disagreement is None
    draws = random.Random(0)
    chosen = [draws.random() < 0.5 for _ in texts]
    assert [p.disagreement is not None for p in audited] == chosen  # the seeded half, deterministically
    assert watch.audited == sum(chosen) == 93  # of 200
    full = _full_classes(model, tokenizer, texts)
    for p, full_class, picked in zip(audited, full, chosen, strict=True):
        if picked:
            assert p.disagreement == float(int(p.logits.argmax()) != full_class)
    assert watch.disagreements == sum(p.disagreement for p in audited if p.disagreement is not None)
    assert 0 < watch.disagreements < watch.audited, "the test means more with both outcomes"
    assert watch.bound() == risk_control.upper_bound(watch.disagreements, watch.audited, 0.95)
    assert watch.full_seconds > 0


def test_classify_with_a_watch_of_ones_own_keeps_counting(patched):
    model, tokenizer = patched
    watch = eek.AuditWatch(1.0, budget=0.5, confidence=0.9, seed=1)
    list(eek.classify(model, word_texts(20, seed=6), tokenizer=tokenizer, audit=watch))
    list(eek.classify(model, word_texts(30, seed=7), tokenizer=tokenizer, audit=watch, ordered=False))
    assert watch.audited == 50
    with pytest.raises(ValueError, match="not both"):
        eek.classify(model, ["w1"], tokenizer=tokenizer, audit=watch, audit_fraction=0.5)
    for bad in (-1, 2.0, float("nan")):
        with pytest.raises(ValueError, match="audit fraction"):
            eek.classify(model, ["w1"], tokenizer=tokenizer, audit_fraction=bad)


def test_classify_audits_a_multi_label_model_per_label():
    model = tiny_model(num_labels=4, num_layers=4)
    model.config.problem_type = "multi_label_classification"
    eek.patch(model, eek.MultiLabelConfidence(0.6))
    with torch.no_grad():  # heads that differ from the model's own: exits that decide otherwise
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn_like(head.weight) * 3.0)
    generator = torch.Generator().manual_seed(1)
    items = [{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=generator).tolist()} for n in range(2, 62)]
    predictions = eek.classify(model, items, audit_fraction=1.0)
    got = list(predictions)
    unpatched = eek.unpatch(copy.deepcopy(model))
    with torch.no_grad():
        for item, p in zip(items, got, strict=True):
            full = unpatched(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            assert p.disagreement == pytest.approx(float(((p.logits > 0) != (full > 0)).float().mean()))
    watch = predictions.audit
    assert watch.audited == 60 and {p.disagreement for p in got} - {0.0, 1.0}, "fractions of labels expected"
    assert not watch.binary
    assert watch.bound() == risk_control.upper_bound(watch.disagreements, 60, 0.95, binary=False)


# ------------------------------------------------------------------------------ the model folder's certificate


def test_budget_and_confidence_come_from_the_certificate_unless_given(saved_classifier, tmp_path):
    import shutil

    from earlyexit_kernels.integrations.model_folder import audit_settings, fit_certificate

    assert fit_certificate(saved_classifier) is None
    assert audit_settings(saved_classifier)[:2] == (None, 0.95)
    assert audit_settings(saved_classifier, 0.02, None)[:2] == (0.02, 0.95)
    folder = tmp_path / "fitted"
    shutil.copytree(saved_classifier, folder)
    certificate = {"budget": 0.01, "confidence": 0.9, "risk": "rows ...", "rows": 2000, "certified": True}
    (folder / "eek_fit.json").write_text(json.dumps({"target": "agreement", "certificate": certificate}))
    assert fit_certificate(str(folder))["budget"] == 0.01
    budget, confidence, source = audit_settings(str(folder))
    assert (budget, confidence) == (0.01, 0.9) and "eek_fit.json" in source
    assert audit_settings(str(folder), 0.05, None)[:2] == (0.05, 0.9)
    assert audit_settings(str(folder), None, 0.99)[:2] == (0.01, 0.99)
    (folder / "eek_fit.json").write_text(json.dumps({"target": "agreement", "confidence": None, "certificate": None}))
    assert audit_settings(str(folder))[:2] == (None, 0.95)


def test_a_certificate_on_accuracy_lost_gives_the_audit_no_disagreement_budget(saved_classifier, tmp_path):
    """The false alarm of issue 63: the demo's folder (certified on accuracy lost, 1 point) audited on its
    own test split warned of a shift at -0.12 points lost, its disagreement being over 1%. Disagreement
    is not what that certificate bounds: no budget from it, and the source says why."""
    import shutil

    from earlyexit_kernels.integrations.model_folder import audit_settings

    folder = tmp_path / "fitted"
    shutil.copytree(saved_classifier, folder)
    certificate = {"budget": 0.01, "confidence": 0.95, "risk": "rows ...", "rows": 1500, "certified": True}
    (folder / "eek_fit.json").write_text(json.dumps({"target": "accuracy", "certificate": certificate}))
    budget, confidence, source = audit_settings(str(folder))
    assert budget is None and confidence == 0.95
    assert "certifies accuracy lost" in source and "--audit-budget" in source
    assert audit_settings(str(folder), 0.03, None)[:2] == (0.03, 0.95)  # a budget given is the user's
    watch = AuditWatch(1.0, budget=budget, confidence=confidence)
    watch.record([0.0] * 200 + [1.0] * 20)  # 9% disagreement, which may cancel in accuracy
    assert watch.over_budget is None and watch.rate == pytest.approx(20 / 220)  # reported, no warning


# ------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--audit-fraction", "1.5"], "error: --audit-fraction 1.5: the audit fraction must be a number in [0, 1]"),
        (["--audit-fraction", "-0.1"], "error: --audit-fraction -0.1: the audit fraction must be a number in [0, 1]"),
        (["--audit-fraction", "nan"], "error: --audit-fraction nan: the audit fraction must be a number in [0, 1]"),
        (
            ["--audit-fraction", "0.1", "--audit-budget", "100"],
            "error: --audit-budget 100 percentage points: the audit budget must be a fraction of sequences in [0, 1)",
        ),
        (
            ["--audit-fraction", "0.1", "--audit-confidence", "95"],
            "error: --audit-confidence 95: the audit confidence must be a probability strictly between 0 and 1",
        ),
        (["--audit-budget", "1"], "error: --audit-budget and --audit-confidence set the audit"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "classify"])
def test_the_command_line_refuses_bad_audit_options_in_one_line(command, arguments, message, saved_classifier, capsys):
    from earlyexit_kernels.integrations.cli import main

    files = ["in.csv", "out.csv"] if command == "classify" else []
    assert main([command, saved_classifier, *files, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_the_command_line_classifies_a_file_with_an_audit(saved_classifier, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from earlyexit_kernels.integrations.cli import main

    texts = [t or "w0" for t in word_texts(40, seed=9)]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    arguments = ["classify", saved_classifier, str(tmp_path / "in.csv"), str(tmp_path / "out.csv")]
    assert main([*arguments, "--audit-fraction", "1", "--audit-budget", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "audit: 1 of the rows also run by the full model; budget 2%, confidence 95% (as given)" in err
    assert re.search(r"audit: 40 sequences also run by the full model \(fraction 1\), disagreement", err)
    written = pd.read_csv(tmp_path / "out.csv")
    assert written.audit_disagreement.notna().all() and set(written.audit_disagreement) <= {0.0, 1.0}


# ------------------------------------------------------------------------------ Ray Data's class


def test_ray_datas_class_adds_each_audited_rows_disagreement(saved_classifier):
    pd = pytest.importorskip("pandas", reason="the Ray integration works on pandas batches")
    from earlyexit_kernels.integrations.ray_data import (
        AUDIT_COLUMN,
        ClassifierSettings,
        EarlyExitClassifier,
        _audit_summary,
    )

    frame = pd.DataFrame({"text": [t or "w0" for t in word_texts(40, seed=10)]})
    assert AUDIT_COLUMN not in EarlyExitClassifier(saved_classifier)(frame).columns
    classifier = EarlyExitClassifier(saved_classifier, audit_fraction=0.5, audit_budget=0.2)
    out = classifier(frame)
    out = classifier(frame)  # the actor's watch counts over its batches
    draws = random.Random(0)
    chosen = [draws.random() < 0.5 for _ in range(80)][40:]
    assert out[AUDIT_COLUMN].notna().tolist() == chosen
    model, tokenizer = classifier.model, classifier.tokenizer
    full = _full_classes(model, tokenizer, frame.text.tolist())
    local = list(eek.classify(model, frame.text.tolist(), tokenizer=tokenizer))
    for value, p, full_class in zip(out[AUDIT_COLUMN], local, full, strict=True):
        if not pd.isna(value):
            assert value == float(int(p.logits.argmax()) != full_class)
    draws = random.Random(0)
    assert classifier.audit.audited == sum(draws.random() < 0.5 for _ in range(80))
    assert classifier.audit.budget == 0.2
    settings = ClassifierSettings(audit_fraction=0.5, audit_budget=0.2)
    summary = _audit_summary(out[AUDIT_COLUMN], saved_classifier, settings)
    audited = out[AUDIT_COLUMN].dropna()
    assert summary["audited"] == len(audited) and summary["disagreements"] == audited.sum()
    assert summary["bound"] == risk_control.upper_bound(float(audited.sum()), len(audited), 0.95)


@pytest.mark.ray
def test_ray_files_summarise_the_audit_over_every_row(saved_classifier, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is optional (the ray extra)")
    pytest.importorskip("ray.data", reason="Ray Data is optional: pip install 'ray[data]'")
    pd = pytest.importorskip("pandas")
    from earlyexit_kernels.ray import classify_files

    pd.DataFrame({"text": word_texts(200, seed=11)}).to_csv(tmp_path / "in.csv", index=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = classify_files(
            saved_classifier, str(tmp_path / "in.csv"), str(tmp_path / "out"), workers=2, audit_fraction=1.0
        )
    finally:
        ray.shutdown()
    written = pd.read_parquet(tmp_path / "out")
    assert summary["audit"]["audited"] == 200 == written.audit_disagreement.notna().sum()
    assert summary["audit"]["disagreements"] == written.audit_disagreement.sum()


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def servers(patched):
    pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
    pytest.importorskip("uvicorn", reason="the server needs uvicorn")
    pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
    pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from served_models import RunningServer

    from earlyexit_kernels.integrations.server import create_app

    model, tokenizer = patched
    plain = RunningServer(create_app(model, tokenizer, max_batch_size=16))
    audited = RunningServer(create_app(model, tokenizer, max_batch_size=16, audit_fraction=1.0, audit_budget=0.0))
    yield plain, audited
    plain.close()
    audited.close()


def _metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(eek_audit_\w+) (\S+)$", text, re.MULTILINE)}


def _wait_for_audited(url: str, count: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while True:
        metrics = _metrics(url)
        if metrics.get("eek_audit_sequences_total", 0) >= count or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_a_server_auditing_every_sequence_answers_as_without_and_exports_the_watch(servers, patched, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    plain, audited = servers
    model, tokenizer = patched
    texts = [t or "w0" for t in word_texts(40, seed=12)]
    body = {"inputs": [[t] for t in texts]}
    assert not _metrics(plain.url), "a server without audit exports no audit metric"

    expected = plain.post("/predict", body).json()
    got = audited.post("/predict", body).json()
    assert got == expected

    metrics = _wait_for_audited(audited.url, len(texts))
    full = _full_classes(model, tokenizer, texts)
    answered = [model.config.label2id[answer[0]["label"]] for answer in got]
    disagreements = sum(a != f for a, f in zip(answered, full, strict=True))
    assert metrics["eek_audit_sequences_total"] == len(texts)
    assert metrics["eek_audit_disagreements_total"] == disagreements > 0
    assert metrics["eek_audit_disagreement_rate"] == pytest.approx(disagreements / len(texts))
    assert metrics["eek_audit_disagreement_bound"] == pytest.approx(
        risk_control.upper_bound(disagreements, len(texts), 0.95), rel=1e-12
    )
    assert (metrics["eek_audit_budget"], metrics["eek_audit_confidence"], metrics["eek_audit_fraction"]) == (0, 0.95, 1)
    assert metrics["eek_audit_over_budget"] == 1.0  # a zero budget: any disagreement passes it
    assert metrics["eek_audit_full_model_seconds_total"] > 0 and metrics["eek_audit_skipped_total"] == 0
    deadline = time.monotonic() + 10
    while not _warnings(caplog) and time.monotonic() < deadline:  # logged just after the count it is about
        time.sleep(0.01)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "budget of 0%" in warned[0]

    import httpx

    info = httpx.get(audited.url + "/info", timeout=10).json()
    assert info["audit"] == {"fraction": 1.0, "budget": 0.0, "confidence": 0.95, "accuracy_budget": None}
    assert httpx.get(plain.url + "/info", timeout=10).json()["audit"] is None


def test_a_server_without_a_budget_exports_the_disagreement_and_no_budget(patched):
    from served_models import RunningServer

    from earlyexit_kernels.integrations.server import create_app

    model, tokenizer = patched
    running = RunningServer(create_app(model, tokenizer, audit_fraction=0.5, audit_seed=4))
    try:
        texts = [t or "w0" for t in word_texts(30, seed=13)]
        running.post("/predict", {"inputs": [[t] for t in texts]})
        draws = random.Random(4)
        expected = sum(draws.random() < 0.5 for _ in texts)
        metrics = _wait_for_audited(running.url, expected)
        assert metrics["eek_audit_sequences_total"] == expected
        assert "eek_audit_budget" not in metrics and "eek_audit_over_budget" not in metrics
        assert "eek_audit_disagreement_bound" in metrics
    finally:
        running.close()
    with pytest.raises(ValueError, match="audit fraction"):
        create_app(model, tokenizer, audit_fraction=1.5)


def test_the_labelled_rows_kept_stay_within_the_window_and_the_counts_cover_them_all():
    # a server fed labels for weeks keeps the latest PAIRED_WINDOW paired losses, not every one
    from earlyexit_kernels.engine.entry.audit import PAIRED_WINDOW

    watch = AuditWatch(0.5)
    early = [1, 0, 0, -1, 0, 0, 0, 0] * (PAIRED_WINDOW // 8)  # no accuracy lost net: 1/8 - 1/8
    late = [1, 0, 0, 0] * 4096  # then 25 points lost
    for chunk in range(0, len(early), 4096):
        watch.record_labelled(early[chunk : chunk + 4096])
    assert watch.accuracy_lost == pytest.approx(0.0)
    watch.record_labelled(late)
    assert watch.labelled == PAIRED_WINDOW + 4 * 4096
    assert watch.exit_wrong_full_right == PAIRED_WINDOW // 8 + 4096
    assert watch.exit_right_full_wrong == PAIRED_WINDOW // 8
    assert watch.accuracy_window == PAIRED_WINDOW and len(watch._paired) == PAIRED_WINDOW
    window = early[4 * 4096 :] + late
    assert watch.accuracy_lost == pytest.approx(sum(window) / PAIRED_WINDOW)
