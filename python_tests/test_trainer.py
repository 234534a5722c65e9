"""The patched forward returns the chosen method's loss, so a plain transformers.Trainer trains the exit heads."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from model_comparison import assert_same_function, assert_same_weights
from threshold_helpers import assert_clear_of_threshold

import earlyexit_kernels as eek
from earlyexit_kernels.methods import losses


class _Rows(torch.utils.data.Dataset):
    """Fixed-length rows whose label is readable from token 1 (a tiny model learns it in a few steps)."""

    def __init__(self, size=32, seed=0):
        ids, mask, _ = tiny_batch(size, 10, seed=seed, padded=False)
        self.labels = torch.arange(size) % 3
        ids[:, 1] = 5 + self.labels * 10
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_training_mode_returns_the_objectives_loss():
    model = eek.patch(tiny_model("bert", num_layers=3), eek.DACT(), objective="dact")
    eek.set_training_objective(model, "dact", tau=0.5)
    ids, mask, _ = tiny_batch(4, 8)
    labels = torch.tensor([0, 1, 2, 0])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected = losses.dact_loss(out.all_logits, out.all_halting, labels, tau=0.5)
    assert torch.allclose(out.loss, expected)
    model.eval()  # evaluation keeps Hugging Face's loss on the exit logits
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    eek.set_training_objective(model, None)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_objective_must_fit_the_policy():
    model = eek.patch(tiny_model("bert", num_layers=3), eek.Entropy(0.3))
    with pytest.raises(ValueError, match="QExit"):
        eek.set_training_objective(model, "palbert")
    with pytest.raises(ValueError, match="method must be one of"):
        eek.set_training_objective(model, "nonsense")
    with pytest.raises(ValueError, match="patched"):
        eek.set_training_objective(tiny_model("bert"), "pabee")


@pytest.mark.parametrize(("method", "policy"), [("pabee", eek.Patience(1)), ("palbert", eek.QExit())])
def test_hugging_face_trainer_trains_with_the_objective(tmp_path, method, policy):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", num_layers=3)
    model.train()
    eek.patch(model, policy, objective=method)
    data = _Rows()
    ids = data.ids
    labels = data.labels
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=data.mask, labels=labels).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=4,
        learning_rate=3e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 16
    with torch.no_grad():
        model.train()
        out = model(input_ids=ids, attention_mask=data.mask, labels=labels)
    after = out.loss.item()
    objective = losses.objective(method)
    assert out.loss.item() == pytest.approx(objective(out, labels).item(), rel=1e-6)
    assert after < 0.9 * before, (before, after)

    # the Trainer's own save writes the exit heads too; eek.from_pretrained restores them
    trainer.save_model(str(tmp_path / "saved"))
    loaded = eek.from_pretrained(str(tmp_path / "saved"))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=data.mask, return_all_exits=True)
        b = loaded(input_ids=ids, attention_mask=data.mask, return_all_exits=True)
    assert_same_weights(loaded, model)
    assert_same_function(b.all_logits, a.all_logits)
    assert_clear_of_threshold(policy, a, 3)  # so rounding cannot move an exit
    assert torch.equal(a.exit_layer, b.exit_layer)
