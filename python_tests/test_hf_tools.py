"""A patched model inside Hugging Face's own tools: ``pipeline`` and ``Trainer``.

Both treat every field of a model's output as a per-row tensor (the pipeline unbatches
it, the Trainer gathers it), so nothing in a patched model's output may break that, and
what they hand the user must be what the unpatched model would have given.
"""

import json

import numpy as np
import pytest
import torch
from conftest import word_texts
from transformers import AutoTokenizer, Trainer, TrainingArguments, pipeline

import earlyexit_kernels as eek


def _one_by_one(model, tokenizer, texts):
    """(label id, probability of it, exit layer) of each text run alone."""
    answers = []
    with torch.no_grad():
        for text in texts:
            out = model(**tokenizer(text, return_tensors="pt"))
            probs = out.logits.float().softmax(-1)[0]
            answers.append((int(probs.argmax()), float(probs.max()), int(out.exit_layer[0])))
    return answers


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_pipeline_at_any_batch_size_gives_each_text_its_own_answer(saved_classifier, batch_size):
    model = eek.from_pretrained(saved_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    texts = word_texts(40, seed=3)  # lengths 0..30 words: batches are padded
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, batch_size=batch_size)

    got = classifier(texts)

    for answer, (label, score, _) in zip(got, _one_by_one(model, tokenizer, texts), strict=True):
        assert answer["label"] == model.config.id2label[label]
        assert answer["score"] == pytest.approx(score, abs=1e-5)


def test_pipeline_batches_really_exit_at_different_layers(saved_classifier):
    # Otherwise the pipeline test above would not show that per-row exits survive unbatching.
    model = eek.from_pretrained(saved_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    layers = {exit_layer for _, _, exit_layer in _one_by_one(model, tokenizer, word_texts(40, seed=3))}
    assert len(layers) > 1


def test_host_syncs_is_an_attribute_not_an_output_field(saved_classifier):
    model = eek.from_pretrained(saved_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    with torch.no_grad():
        out = model(**tokenizer(["w1 w2", "w3"], padding=True, return_tensors="pt"))
    assert "host_syncs" not in out.keys()
    assert isinstance(out.host_syncs, int) and out.host_syncs >= 1


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels):
        self.rows = [dict(tokenizer(t), labels=y) for t, y in zip(texts, labels, strict=True)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _accuracy(eval_prediction):
    # Written for the plain model: predictions is the [N, C] logits array.
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_prediction.label_ids).mean())}


def test_trainer_predict_and_evaluate_with_metrics_see_what_the_plain_model_gives(saved_classifier, tmp_path):
    model = eek.from_pretrained(saved_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    texts = word_texts(24, seed=5)
    labels = [i % 3 for i in range(len(texts))]
    data = _Rows(tokenizer, texts, labels)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, compute_metrics=_accuracy, processing_class=tokenizer)

    predicted = trainer.predict(data)
    metrics = trainer.evaluate(data)

    expected = np.array([label for label, _, _ in _one_by_one(model, tokenizer, texts)])
    assert predicted.predictions.shape == (len(texts), 3)
    np.testing.assert_array_equal(predicted.predictions.argmax(-1), expected)
    assert metrics["eval_accuracy"] == pytest.approx(float((expected == np.array(labels)).mean()))


def test_trainer_predict_returns_exit_layers_when_asked(saved_classifier, tmp_path):
    model = eek.from_pretrained(saved_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    texts = word_texts(12, seed=6)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)

    logits, exit_layer, layers_run = trainer.predict(_Rows(tokenizer, texts, [0] * 12), ignore_keys=[]).predictions

    expected = [layer for _, _, layer in _one_by_one(model, tokenizer, texts)]
    assert logits.shape == (12, 3)
    assert exit_layer.tolist() == expected == layers_run.tolist()


def test_the_trainer_keys_stay_out_of_the_saved_config_and_leave_with_unpatch(saved_classifier, tmp_path):
    model = eek.from_pretrained(saved_classifier)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("keys_to_ignore" in key or key.startswith("_eek") for key in saved)
    assert "exit_layer" in model.config.keys_to_ignore_at_inference  # still hidden after saving

    eek.unpatch(model)
    assert "keys_to_ignore_at_inference" not in vars(model.config)


def _backends_here():
    names = ["auto", "torch", "cpp"]
    if eek.backends().get("triton"):
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize(
    "policy", [eek.Entropy(0.3), eek.Patience(1), eek.QExit(0.5), eek.SkipGates(entropy_threshold=0.3)], ids=repr
)
def test_returned_logits_are_differentiable_whenever_grad_is_enabled_on_every_backend(backend, policy):
    from conftest import tiny_batch, tiny_model

    model = eek.patch(tiny_model("bert", num_layers=3), policy, backend=backend)
    ids, mask, types = tiny_batch(4, 8)
    labels = torch.tensor([0, 1, 2, 0])
    for mode in (model.train, model.eval):
        mode()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        assert out.logits.requires_grad
        out.loss.backward()
        heads = [*model.classifier.parameters(), *model.early_exit_heads.classifiers.parameters()]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bert.encoder.parameters())


def test_under_no_grad_the_chosen_backend_still_runs():
    from conftest import tiny_batch, tiny_model

    model = eek.patch(tiny_model("bert", num_layers=3), eek.Entropy(0.3), backend="cpp").eval()
    ids, mask, _ = tiny_batch(4, 8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert not out.logits.requires_grad


def test_a_trainer_without_an_objective_trains_with_the_default_backend(saved_classifier, tmp_path):
    model = eek.from_pretrained(saved_classifier)  # backend "auto": cpp on this CPU
    tokenizer = AutoTokenizer.from_pretrained(saved_classifier)
    texts = word_texts(16, seed=7)
    data = _Rows(tokenizer, texts, [i % 3 for i in range(16)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()

    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("early_exit_heads.") for name in moved)
    assert any(name.startswith("bert.encoder.") for name in moved)
