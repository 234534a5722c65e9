"""A threshold certified on another base (``eek calibrate --dtype int8``).

By default the risk is measured against the float32 full model the user validated, one reference for every
base: accuracy lost where the rows have labels, disagreement where not, so that the int8 base's own changes
(here it agrees with float32 on about 93% of the rows) and the exits' count together against one budget.
``--risk agreement`` bounds what the exits add to the base instead: their disagreement with the int8 full
depth, labelled rows or not. The report gives the agreements with the float32 full model apart. Re-draw
tests check both bounds: over 100 draws of calibration rows, the certified threshold's risk on the whole
population is over the budget at most 1 - confidence of the time.
"""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import word_bert, word_texts
from transformers import AutoTokenizer

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import disagreement
from earlyexit_kernels.engine.layers.precision import to_base
from earlyexit_kernels.training.calibrate_model import calibrate, record_exits
from earlyexit_kernels.training.labelled_texts import LabelledTexts

pytest.importorskip("torch.ao.quantization", reason="int8 needs torch's quantized engine")

LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def _spread_model(folder):
    """A tiny BERT whose predictions vary with the text (weights drawn wider than BERT's 0.02), patched."""
    model, tokenizer = word_bert(folder, 3, labels=LABELS, initializer_range=0.3)
    return eek.patch(model, eek.Entropy(0.0)), tokenizer


def _batches(tokenizer, texts):
    return [dict(tokenizer(texts[i : i + 256], padding=True, return_tensors="pt")) for i in range(0, len(texts), 256)]


@pytest.fixture(scope="module")
def int8_population(tmp_path_factory):
    """The int8 base's every head on 3,000 texts (no labels), and the float32 full model's predictions."""
    model, tokenizer = _spread_model(tmp_path_factory.mktemp("spread"))
    int8 = to_base(copy.deepcopy(model), "int8")
    texts = [t or "w1" for t in word_texts(3_000, seed=5)]
    with torch.no_grad():
        record = record_exits(int8, _batches(tokenizer, texts))
        float32_full = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return record, float32_full


def test_the_int8_base_changes_labels_of_its_own(int8_population):
    record, float32_full = int8_population
    base_agreement = 1 - float(disagreement(record.all_logits[-1], float32_full).mean())
    assert 0.80 < base_agreement < 0.995  # what the certificate must not let the exits' changes cancel against


@pytest.mark.parametrize("reference", ["int8 full depth", "float32 full model"])
def test_redrawn_calibration_rows_keep_the_exits_within_the_budget(int8_population, reference):
    record, float32_full = int8_population
    rows, draws, confidence = 400, 100, 0.9
    budget = 0.05
    if reference == "float32 full model":
        # the int8 base alone disagrees with float32 on some 7% of these rows: the budget holds it and some exits
        record = dataclasses.replace(record, reference_logits=float32_full.to(record.all_logits.dtype))
        base_risk = float(disagreement(record.all_logits[-1], float32_full).mean())
        budget = base_risk + 0.05
    full = record.full_logits
    true_risk: dict[str, float] = {}

    def risk_of(policy) -> float:
        key = policy.to_code()
        if key not in true_risk:
            true_risk[key] = float(disagreement(replay(policy, record).logits, full).mean())
        return true_risk[key]

    # the uncertified point, for teeth: the most aggressive candidate of the certificate's grid within the
    # budget on the drawn rows (each candidate's per-row disagreement computed once on the population)
    grid = certified_candidates(record.policy, record.num_layers, full.shape[-1])
    losses = torch.stack([disagreement(replay(p, record).logits, full) for p in grid])
    g = torch.Generator().manual_seed(2)
    certified_over = uncertified_over = saving = 0
    for _ in range(draws):
        sample = torch.randint(0, full.shape[0], (rows,), generator=g)
        certified = calibrate(record.subset(sample), max_drop=100 * budget, confidence=confidence, policy=record.policy)
        certified_over += risk_of(certified.policy) > budget
        saving += certified.met and certified.mean_layers < record.num_layers
        within = (losses[:, sample].mean(1) <= budget).nonzero().squeeze(-1)
        uncertified_over += float(losses[int(within.max())].mean()) > budget
    assert certified_over / draws <= 1 - confidence
    assert uncertified_over / draws > 0.25  # the check has teeth: the uncertified point is over budget often
    assert saving > draws / 2  # and the certified threshold still exits early


@pytest.fixture(scope="module")
def spread_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spread_folder")
    model, tokenizer = _spread_model(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _labelled(count: int, seed: int) -> LabelledTexts:
    texts = [t or "w1" for t in word_texts(count, seed=seed)]
    return LabelledTexts(texts, None, [LABELS[len(t.split()) % 3] for t in texts], "rows.csv", "label")


def _copy(spread_folder, folder):
    folder.mkdir()
    for path in spread_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_eek_calibrate_dtype_int8_certifies_against_the_float32_full_model_by_default(spread_folder, tmp_path):
    from earlyexit_kernels.integrations.recertify_folder import calibrate_folder

    folder = _copy(spread_folder, tmp_path / "copy")
    rows = _labelled(1_200, 7)
    report = calibrate_folder(str(folder), rows, max_drop=5.0, confidence=0.9, dtype="int8", force=True)
    assert (report.target, report.base, report.base_risk) == ("accuracy", "int8", "reference")
    # the full model of the risk is the float32 one (never exits: Entropy(0.0)): its accuracy, measured here
    model = eek.from_pretrained(str(spread_folder))
    tokenizer = AutoTokenizer.from_pretrained(str(spread_folder))
    labels = torch.tensor([{v: k for k, v in LABELS.items()}[label] for label in rows.labels])
    with torch.no_grad():
        logits = torch.cat([model(**batch).logits for batch in _batches(tokenizer, rows.texts)])
    assert report.full_accuracy == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))
    text = "\n".join(report.summary())
    assert "the risk is accuracy lost against the float32 full model, on the labels" in text
    assert json.loads((folder / "eek_fit.json").read_text())["recalibrations"][-1]["base"] == "int8"

    # without labels: disagreement with the float32 full model, which is what the report's exits line says
    unlabelled = dataclasses.replace(rows, labels=None)
    agreement = calibrate_folder(str(folder), unlabelled, max_drop=10.0, confidence=0.9, dtype="int8", force=True)
    assert (agreement.target, agreement.base_risk) == ("agreement", "reference")
    assert agreement.full_accuracy == 1.0  # the reference agrees with itself; the int8 full depth does not
    assert agreement.accuracy == pytest.approx(agreement.agreements["exits"])
    assert agreement.agreements["base_full"] < 1.0
    assert "the risk is disagreement with the float32 full model" in "\n".join(agreement.summary())
    assert json.loads((folder / "eek_fit.json").read_text())["recalibrations"][-1]["risk"] == "reference"
    from earlyexit_kernels.patching.fit_record import FitRecord

    assert FitRecord.load(folder).base_risk == "reference"

    # the audit runs the served base's own full depth, not the float32 model: no online re-certification
    from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate

    served = eek.policy_of(eek.from_pretrained(str(folder)))
    certificate, why = resolve_online_certificate(str(folder), served, None, fraction=0.5)
    assert certificate is None and "bounds the disagreement with the saved full model" in why


def test_eek_calibrate_risk_agreement_certifies_against_the_int8_full_depth_and_reports_float32_apart(
    spread_folder, tmp_path
):
    from earlyexit_kernels.integrations.recertify_folder import calibrate_folder

    folder = _copy(spread_folder, tmp_path / "copy")
    report = calibrate_folder(
        str(folder), _labelled(1_200, 7), max_drop=5.0, confidence=0.9, dtype="int8", risk="agreement", force=True
    )
    assert report.target == "agreement" and report.base == "int8"  # labelled rows, yet agreement
    agreements = report.agreements
    assert set(agreements) == {"base_full", "exits", "exits_base"}
    assert agreements["exits_base"] == pytest.approx(report.accuracy)
    assert agreements["base_full"] < 1.0 and 0 < agreements["exits"] <= 1.0
    text = "\n".join(report.summary())
    assert "certified on the int8 base: the risk is the exits' disagreement with the int8 full depth" in text
    assert "agreement with the float32 full model: int8 full depth" in text
    saved = json.loads((folder / "eek_fit.json").read_text())
    assert saved["recalibrations"][-1]["base"] == "int8"

    # accuracy lost on the labels, asked for
    accuracy = calibrate_folder(
        str(folder), _labelled(1_200, 7), max_drop=5.0, confidence=0.9, dtype="int8", risk="accuracy", force=True
    )
    assert accuracy.target == "accuracy" and accuracy.base == "int8"


def test_risk_accuracy_without_labels_and_an_unknown_risk_are_refused(spread_folder):
    from earlyexit_kernels.integrations.recertify_folder import calibrate_folder
    from earlyexit_kernels.training.fit_config import FitError

    unlabelled = LabelledTexts(word_texts(50, seed=1), None, None, "rows.csv")
    with pytest.raises(FitError, match="--risk accuracy needs"):
        calibrate_folder(str(spread_folder), unlabelled, dtype="int8", risk="accuracy")
    with pytest.raises(FitError, match="--risk must be auto, reference, agreement or accuracy"):
        calibrate_folder(str(spread_folder), unlabelled, risk="labels")


def test_unlabelled_rows_join_a_certificate_against_the_float32_full_model(spread_folder, tmp_path):
    # the unlabelled rows' full model is the float32 one too: prediction-powered with labels, more rows without
    from earlyexit_kernels.integrations.recertify_folder import calibrate_folder

    folder = _copy(spread_folder, tmp_path / "copy")
    more = LabelledTexts([t or "w1" for t in word_texts(600, seed=9)], None, None, "more.csv")
    labelled = calibrate_folder(
        str(folder), _labelled(1_200, 7), max_drop=5.0, confidence=0.9, dtype="int8", unlabelled=more, force=True
    )
    assert (labelled.target, labelled.base_risk) == ("accuracy", "reference") and labelled.certificate is not None
    rows = dataclasses.replace(_labelled(1_200, 7), labels=None)
    joined = calibrate_folder(
        str(folder), rows, max_drop=10.0, confidence=0.9, dtype="int8", unlabelled=more, force=True
    )
    assert (joined.target, joined.base_risk) == ("agreement", "reference")
    assert joined.certificate["rows"] == 1_800  # the 600 unlabelled rows joined the 1,200


def test_a_record_against_a_reference_keeps_it_through_subsets_and_joins():
    from earlyexit_kernels.calibration.certify import _joined
    from earlyexit_kernels.methods.policies import Entropy

    g = torch.Generator().manual_seed(0)
    logits, reference = torch.randn(3, 5, 2, generator=g), torch.randn(5, 2, generator=g)
    record = ExitRecord(logits, None, None, None, Entropy(0.1), reference)
    assert torch.equal(record.full_logits, reference)
    assert torch.equal(record.subset(torch.tensor([4, 1])).full_logits, reference[[4, 1]])
    plain = ExitRecord(logits[:, :2], None, None, None, Entropy(0.1))  # its own last layer is its full model
    joined = _joined(record, plain)
    assert torch.equal(joined.full_logits, torch.cat([reference, logits[-1, :2]]))
    assert _joined(plain, plain).reference_logits is None
    with pytest.raises(ValueError, match="one row per recorded row"):
        ExitRecord(logits, None, None, None, Entropy(0.1), reference[:4])
