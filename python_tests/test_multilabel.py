"""Multi-label classifiers (``problem_type="multi_label_classification"``): one sigmoid per label.

``MultiLabelConfidence(t)`` lets a row leave when every label is decided with probability
``t`` either way (the rule of docs/exit_methods.md); the rules that read a softmax are
refused at patch; every backend gives the reference's decisions and, at full depth, the
unpatched model's logits; the per-label losses train and calibration measures micro-F1.
"""

import math

import pytest
import torch
from conftest import tiny_batch, tiny_model
from model_comparison import assert_same_function

import earlyexit_kernels as eek
from earlyexit_kernels.methods import losses
from earlyexit_kernels.methods.exit_rules import exit_step, init_state
from earlyexit_kernels.training import calibrate_model

MULTI = "multi_label_classification"


def multi_label_model(num_labels: int = 5, seed: int = 0):
    model = tiny_model("bert", num_labels=num_labels, seed=seed)
    model.config.problem_type = MULTI
    return model


def rule_by_definition(threshold: float, logits: torch.Tensor) -> torch.Tensor:
    """docs/exit_methods.md: every label's sigmoid probability p has max(p, 1 - p) >= threshold."""
    p = torch.sigmoid(logits.double())
    return (torch.maximum(p, 1 - p) >= threshold).all(-1) & torch.isfinite(logits).all(-1)


def test_the_rule_is_its_definition_away_from_the_threshold():
    logits = torch.randn(400, 4) * 3
    for threshold in (0.5, 0.7, 0.9, 0.99):
        exits, returned, _ = exit_step(eek.MultiLabelConfidence(threshold), 1, 4, logits, None, {})
        p = torch.sigmoid(logits.double())
        near = ((torch.maximum(p, 1 - p) - threshold).abs() < 1e-6).any(-1)
        assert torch.equal(exits[~near], rule_by_definition(threshold, logits)[~near])
        assert torch.equal(returned, logits)
    assert exit_step(eek.MultiLabelConfidence(0.5), 1, 4, logits, None, {})[0].all()
    assert not exit_step(eek.MultiLabelConfidence(1.0), 1, 4, logits, None, {})[0].any()


def test_a_non_finite_label_never_exits_and_the_last_layer_always_does():
    logits = torch.tensor([[9.0, -9.0], [9.0, math.nan], [9.0, math.inf], [0.1, 9.0]])
    policy = eek.MultiLabelConfidence(0.9)
    assert exit_step(policy, 1, 3, logits, None, {})[0].tolist() == [True, False, False, False]
    assert exit_step(policy, 3, 3, logits, None, {})[0].all()


def test_per_layer_thresholds_and_bad_values():
    policy = eek.MultiLabelConfidence((0.99, 0.6, 0.5))
    logits = torch.tensor([[1.0, -1.0]])  # p = 0.73 either way
    assert [bool(exit_step(policy, layer, 3, logits, None, {})[0]) for layer in (1, 2)] == [False, True]
    for bad in (0.4, 1.5, math.nan, ()):
        with pytest.raises(ValueError, match="MultiLabelConfidence"):
            eek.MultiLabelConfidence(bad)
    with pytest.raises(ValueError, match="3 values but the model has 4 layers"):
        eek.patch(multi_label_model(), policy)


@pytest.mark.parametrize(
    "policy", [eek.Entropy(0.3), eek.MaxProb(0.9), eek.Patience(2), eek.Voting(2), eek.DACT(), eek.SkipGates(0.5, 0.3)]
)
def test_rules_that_read_a_softmax_are_refused_on_a_multi_label_model(policy):
    with pytest.raises(ValueError, match=r"multi-label model.*eek\.MultiLabelConfidence\(0\.9\)"):
        eek.patch(multi_label_model(), policy)


def test_multi_label_confidence_is_refused_on_a_single_label_model():
    with pytest.raises(ValueError, match="MultiLabelConfidence is for multi-label models"):
        eek.patch(tiny_model("bert"), eek.MultiLabelConfidence(0.9))


def spread_threshold(model, ids, mask) -> float:
    """A threshold midway between two rows' least-decided labels at layer 2, so exits spread."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, return_all_exits=True)
    least = out.all_logits[1].float().abs().amin(-1).sort().values
    middle = len(least) // 2
    margin = float(least[middle - 1] + least[middle]) / 2
    return 1.0 / (1.0 + math.exp(-margin))


def _sharpened(model):
    """``model`` (patched) with its exit heads' weights 8 times larger: decided labels on some rows, not on others."""
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.weight.mul_(8.0)
    return model


@pytest.mark.exact
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_every_backend_decides_as_the_reference_and_is_exact_at_full_depth(backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} is not available here: {eek.backend_status()[backend]}")
    ids, mask, types = tiny_batch(16, 10, seed=3)
    model = multi_label_model()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    _sharpened(eek.patch(model, eek.MultiLabelConfidence(1.0), backend=backend))
    with torch.no_grad():
        never = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        assert torch.equal(never.logits, full), "at full depth the logits are the unpatched model's"
        assert (never.exit_layer == 4).all()

        eek.patch(model, eek.MultiLabelConfidence(spread_threshold(model, ids, mask)), backend=backend)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        eek.patch(model, eek.policy_of(model), backend="torch")
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert len(set(out.exit_layer.tolist())) > 1, "exits should spread for this test to mean much"
    assert torch.equal(out.exit_layer, reference.exit_layer)
    assert torch.equal(out.logits, reference.logits)
    # Rows that ran every layer did so in a batch compacted around them: the same function as
    # the full batch, to rounding (model_comparison.py).
    last = out.exit_layer == 4
    assert_same_function(out.logits[last], full[last])


def test_eek_classify_gives_the_forward_on_each_input():
    ids, mask, _ = tiny_batch(8, 10, seed=5)
    model = _sharpened(eek.patch(multi_label_model(), eek.MultiLabelConfidence(1.0)))
    with torch.no_grad():
        eek.patch(model, eek.MultiLabelConfidence(spread_threshold(model, ids, mask)))
        rows = [{"input_ids": ids[b, : int(mask[b].sum())]} for b in range(8)]
        for b, prediction in enumerate(eek.classify(model, rows)):
            alone = model(input_ids=rows[b]["input_ids"][None])
            torch.testing.assert_close(prediction.logits, alone.logits[0], rtol=0, atol=1e-5)
            assert prediction.exit_layer == int(alone.exit_layer[0])


def test_per_label_losses_train_and_the_distillation_is_zero_when_heads_agree():
    torch.manual_seed(0)
    all_logits = torch.randn(4, 6, 3, requires_grad=True)
    labels = torch.randint(0, 2, (6, 3)).float()
    bce = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(all_logits[i], labels) for i in range(4)])
    assert torch.allclose(losses.per_layer_loss(all_logits, labels), bce)
    assert torch.allclose(losses.pabee_loss(all_logits, labels), (torch.arange(1.0, 5) * bce).sum() / 10)
    assert torch.allclose(losses.deebert_stage2_loss(all_logits, labels), bce[:3].sum())
    same = all_logits[-1:].detach().expand(4, 6, 3)
    assert losses.fastbert_loss(same, multi_label=True).item() == pytest.approx(0.0, abs=1e-6)
    distill = losses.fastbert_loss(all_logits, labels)
    p, q = torch.sigmoid(all_logits[-1]), torch.sigmoid(all_logits[:-1])
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    assert distill.item() == pytest.approx(kl.mean(-1).mean(-1).sum().item(), rel=1e-5)
    distill.backward()
    assert all_logits.grad[-1].abs().sum() == 0, "the teacher is detached"
    with pytest.raises(ValueError, match="no multi-label form"):
        losses.objective("ensemble")(type("Out", (), {"all_logits": all_logits})(), labels)


def test_a_patched_multi_label_model_trains_with_the_pabee_objective():
    ids, mask, _ = tiny_batch(6, 8, seed=2)
    labels = torch.randint(0, 2, (6, 5)).float()
    model = eek.patch(multi_label_model(), eek.MultiLabelConfidence(0.9), objective="pabee").train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = losses.pabee_loss(out.all_logits, labels)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.early_exit_heads.classifiers[0].weight.grad.abs().sum() > 0


def test_calibration_measures_micro_f1_and_picks_a_multi_label_threshold():
    ids, mask, _ = tiny_batch(40, 10, seed=4)
    model = _sharpened(eek.patch(multi_label_model(), eek.MultiLabelConfidence(0.9)))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits[-1]
    labels = (full > 0).float()
    labels[::5, 0] = 1 - labels[::5, 0]  # the full model is not perfect
    result = calibrate_model.calibrate(
        model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, max_drop=100.0
    )
    predicted, true = full > 0, labels > 0.5
    tp, wrong = (predicted & true).sum().item(), (predicted ^ true).sum().item()
    assert result.full_accuracy == pytest.approx(2 * tp / (2 * tp + wrong))
    assert isinstance(result.policy, eek.MultiLabelConfidence)
    assert result.mean_layers == pytest.approx(1.0), "any drop allowed: the cheapest candidate exits at layer 1"
    strict = calibrate_model.calibrate(
        model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, max_drop=0.0
    )
    assert strict.accuracy >= strict.full_accuracy - 1e-12


def test_policy_text_round_trips():
    from earlyexit_kernels.methods.policy_spec import parse_policy

    assert parse_policy("MultiLabelConfidence(0.9)") == eek.MultiLabelConfidence(0.9)
    assert repr(eek.MultiLabelConfidence((0.9, 0.8))) == "MultiLabelConfidence((0.9, 0.8))"
    state = init_state(eek.MultiLabelConfidence(0.9), 3, 2, 8, 4, torch.device("cpu"))
    assert state == {}


@pytest.fixture(scope="module")
def multi_label_dir(tmp_path_factory):
    from served_models import multi_label_folder

    return multi_label_folder(tmp_path_factory.mktemp("multi_label"))


def expected_rows(model_dir, texts):
    """Per text: (labels above 0.5 joined by ",", highest probability, every label's probability, exit layer)."""
    from transformers import BertTokenizerFast

    model = eek.from_pretrained(model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    names = [model.config.id2label[c] for c in range(model.config.num_labels)]
    rows = []
    with torch.no_grad():
        for text in texts:
            alone = model(**tokenizer(text, return_tensors="pt"))
            p = torch.sigmoid(alone.logits[0].float())
            chosen = ",".join(n for n, v in zip(names, p.tolist(), strict=True) if v > 0.5)
            rows.append((chosen, float(p.max()), dict(zip(names, p.tolist(), strict=True)), int(alone.exit_layer[0])))
    return rows


def check_rows(out, expected):
    import json

    for row, (chosen, top, every, exit_layer) in zip(out.itertuples(), expected, strict=True):
        assert ("" if row.label is None or row.label != row.label else row.label) == chosen
        assert row.score == pytest.approx(top, abs=1e-6)
        assert json.loads(row.scores) == pytest.approx(every, abs=1e-6)
        assert row.exit_layer == exit_layer
    assert out.exit_layer.nunique() >= 2


def test_the_command_line_writes_every_label_with_its_probability(multi_label_dir, tmp_path):
    pd = pytest.importorskip("pandas", reason="the command line reads and writes tables through pandas/pyarrow")
    pytest.importorskip("pyarrow", reason="the command line reads and writes tables through pyarrow")
    from conftest import word_texts

    from earlyexit_kernels.integrations.cli import main

    texts = [t or "w0" for t in word_texts(40, seed=6)]
    pd.DataFrame({"text": texts}).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    assert (
        main(["classify", multi_label_dir, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--no-progress"])
        == 0
    )
    out = pd.read_json(tmp_path / "out.jsonl", orient="records", lines=True, dtype={"label": str})
    assert list(out.columns) == ["text", "label", "score", "exit_layer", "layers_run", "scores"]
    check_rows(out, expected_rows(multi_label_dir, texts))


def test_ray_data_writes_every_label_with_its_probability(multi_label_dir):
    pd = pytest.importorskip("pandas", reason="the Ray integration works on pandas batches")
    from conftest import word_texts

    from earlyexit_kernels.ray import EarlyExitClassifier

    texts = [t or "w0" for t in word_texts(40, seed=6)]
    out = EarlyExitClassifier(multi_label_dir)(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["text", "label", "score", "exit_layer", "layers_run", "error", "scores"]
    check_rows(out, expected_rows(multi_label_dir, texts))
