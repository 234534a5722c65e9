"""Head-only training converges by default: the cached fast path equals training through the forward,
distillation needs no labels, early stopping stops and keeps the best epoch, fit_exit_heads ties it together."""

import inspect

import pytest
import torch
from conftest import tiny_batch, tiny_model

import earlyexit_kernels as eek
from earlyexit_kernels.training import (
    DEFAULT_LR,
    ExitInputCache,
    cache_exit_inputs,
    cached_exits,
    cached_record,
    fit_exit_heads,
    train_exit_heads,
)
from earlyexit_kernels.training.calibrate_model import record_exits
from earlyexit_kernels.training.fit_config import FitError, TrainSettings
from earlyexit_kernels.training.head_choice import CANDIDATES
from earlyexit_kernels.training.train import PLATEAU, TrainingWarning


def _data(batches=3, size=8, seed=0, labels=True):
    """Label = which of three tokens sits at position 1: learnable by a tiny model."""
    out = []
    for i in range(batches):
        ids, mask, _ = tiny_batch(size, 10, seed=seed * 100 + i)
        classes = (torch.arange(size) + i) % 3
        ids[:, 1] = 5 + classes * 10
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = classes
        out.append(batch)
    return out


HEAD_CHOICES = [{}]
if "pooling" in inspect.signature(eek.patch).parameters:
    HEAD_CHOICES.append({"pooling": "mean", "head": "mlp"})


@pytest.fixture(scope="module")
def fine_tuned():
    """The state of a tiny BERT whose backbone and final classifier learnt the task (DeeBERT's stage 1)."""
    model = eek.patch(tiny_model("bert", num_layers=4), eek.Entropy(0.3))
    train_exit_heads(model, _data(batches=4), method="deebert_stage1", epochs=8, lr=3e-3, progress=False)
    eek.unpatch(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _patched(policy, seed=0, state=None, **head_choice):
    model = tiny_model("bert", num_layers=4, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    eek.patch(model, policy, backend="torch", **head_choice)
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():  # heads away from the final classifier, so that every loss has a gradient
        for p in model.early_exit_heads.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def _heads_state(model):
    return {k: v.detach().clone() for k, v in model.early_exit_heads.state_dict().items()}


@pytest.mark.parametrize("head_choice", HEAD_CHOICES, ids=lambda c: "-".join(c.values()) or "default")
@pytest.mark.parametrize(
    ("policy", "method"),
    [
        (eek.Entropy(0.3), "deebert_stage2"),
        (eek.Entropy(0.3), "fastbert"),
        (eek.QExit(0.5), "palbert"),  # halting head (reads the previous layer too) trains with the heads
        (eek.DACT(), "dact"),
    ],
)
def test_one_cached_step_equals_one_step_through_the_forward(policy, method, head_choice):
    data = _data(batches=1, size=12)
    states = {}
    for cached in (False, True):
        model = _patched(policy, **head_choice)
        log = train_exit_heads(
            model,
            data,
            method=method,
            trains="heads",
            epochs=1,
            lr=0.05,
            optimizer="sgd",
            schedule="constant",
            warmup_fraction=0.0,
            cached=cached,
            progress=False,
        )
        assert log.cached == cached and len(log) == 1
        states[cached] = (_heads_state(model), log[0])
    (reference, ref_loss), (fast, fast_loss) = states[False], states[True]
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name, value in reference.items():
        assert torch.allclose(fast[name], value, atol=1e-6), name
    before = _heads_state(_patched(policy, **head_choice))
    moved = max((reference[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4  # the step did move the heads, so the comparison means something


def test_cached_exits_reproduce_the_all_exits_forward():
    model = _patched(eek.QExit(0.5))
    data = _data(batches=2)
    cache = cache_exit_inputs(model, data)
    assert cache.inputs.shape[:2] == (16, 4) and cache.labels.shape == (16,)
    record = record_exits(model, data)
    from_cache = cached_record(model, cache)
    assert torch.allclose(from_cache.all_logits, record.all_logits, atol=1e-5)
    assert torch.allclose(from_cache.all_halting_logits, record.all_halting_logits, atol=1e-5)
    assert eek.backend_of(model) == "torch" and not model.training


def test_head_only_defaults_take_the_cached_path_at_the_heads_rate(fine_tuned):
    model = _patched(eek.Entropy(0.3), state=fine_tuned)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if "early_exit_heads" not in k}
    log = train_exit_heads(model, _data(), method="deebert", progress=False)
    assert log.cached and log.lr == DEFAULT_LR["heads"] and log.epochs_run == 30 and len(log) == 30 * 3
    assert sum(log[-3:]) < 0.75 * sum(log[:3])  # measured 0.51
    for name, value in model.state_dict().items():
        if name in backbone:
            assert torch.equal(value, backbone[name]), name
    # a joint method trains through the forward at the backbone's rate, one epoch
    joint = train_exit_heads(_patched(eek.Patience(1)), _data(), method="pabee", progress=False)
    assert not joint.cached and joint.lr == DEFAULT_LR["all"] and joint.epochs_run == 1


def test_cached_true_refuses_a_method_that_trains_the_backbone():
    with pytest.raises(ValueError, match="cached=True.*outside the exit heads"):
        train_exit_heads(_patched(eek.Patience(1)), _data(), method="pabee", cached=True, progress=False)


def test_a_generator_trains_many_epochs_on_the_cached_path():
    log = train_exit_heads(_patched(eek.Entropy(0.3)), (b for b in _data()), method="deebert", epochs=4, progress=False)
    assert log.cached and log.epochs_run == 4 and len(log) == 12


def test_self_distillation_trains_without_labels(fine_tuned):
    model = _patched(eek.Entropy(0.3), state=fine_tuned)
    data = _data(labels=False)
    with torch.no_grad():  # heads far from the final classifier, so that there is something to distil
        for head in model.early_exit_heads.classifiers:
            head.weight.normal_(0.0, 1.0)
    cache = cache_exit_inputs(model, data)
    assert cache.labels is None

    def distance():
        with torch.no_grad():
            logits = cached_exits(model, cache).all_logits
        return (logits[:-1].softmax(-1) - logits[-1].softmax(-1)).abs().sum(-1).mean().item()

    before = distance()
    log = train_exit_heads(model, cache, method="fastbert", lr=1e-2, progress=False)
    assert log.cached and log[-1] < 0.3 * log[0]
    assert distance() < 0.7 * before  # measured 0.46 of it
    with pytest.raises(ValueError, match="needs labels"):
        train_exit_heads(model, cache, method="deebert_stage2", progress=False)


def test_early_stopping_stops_and_keeps_the_best_epoch():
    model = _patched(eek.Entropy(0.3))
    train = _data(batches=2, seed=1)
    for batch in train:  # labels unrelated to the inputs: the validation loss soon rises
        batch["labels"] = torch.randint(0, 3, batch["labels"].shape, generator=torch.Generator().manual_seed(3))
    val = _data(batches=2, seed=2)
    val_cache = cache_exit_inputs(model, val)
    log = train_exit_heads(
        model, train, method="deebert", val_batches=val_cache, epochs=200, lr=3e-2, early_stopping=3, progress=False
    )
    assert log.stopped_early and log.epochs_run < 200 and len(log.val_losses) == log.epochs_run
    assert log.best_epoch >= 1 and log.epochs_run == log.best_epoch + 3
    assert log.val_losses[-1] > min(log.val_losses)  # the heads were put back from a later, worse epoch
    assert min(log.val_losses) == log.val_losses[log.best_epoch - 1]
    model.eval()
    with torch.no_grad():
        kept = torch.nn.functional.cross_entropy(
            cached_exits(model, val_cache).all_logits[:-1].reshape(-1, 3), val_cache.labels.repeat(3), reduction="none"
        )
    # the heads left in the model are those of the best epoch: their loss is the best one
    assert kept.view(3, -1).mean(1).sum().item() == pytest.approx(min(log.val_losses), rel=1e-4)


def test_without_an_epoch_count_the_heads_train_until_the_validation_loss_stops_falling(fine_tuned):
    model = _patched(eek.Entropy(0.3), state=fine_tuned)
    val = cache_exit_inputs(model, _data(batches=2, seed=5))
    log = train_exit_heads(model, _data(), method="deebert", val_batches=val, progress=False)
    # the plateau, not a count, ended it: every rate cut was made and the last plateau stopped it
    assert log.until_plateau and log.stopped_early and log.lr_reductions == PLATEAU["reductions"]
    assert not log.capped and log.epochs_run < PLATEAU["cap"] and len(log.val_losses) == log.epochs_run
    assert min(log.val_losses) == log.val_losses[log.best_epoch - 1]
    # without validation data nothing tells a plateau: the fixed count of DEFAULT_EPOCHS
    fixed = train_exit_heads(_patched(eek.Entropy(0.3), state=fine_tuned), _data(), method="deebert", progress=False)
    assert not fixed.until_plateau and fixed.epochs_run == 30


def test_a_cap_reached_while_the_validation_loss_still_falls_is_a_warning_with_the_numbers(fine_tuned):
    model = _patched(eek.Entropy(0.3), state=fine_tuned)
    val = cache_exit_inputs(model, _data(batches=2, seed=5))
    with pytest.warns(TrainingWarning, match=r"cap of 3 epochs with the validation loss still falling \(\d\.\d{4}"):
        log = train_exit_heads(model, _data(), method="deebert", val_batches=val, epochs=3, lr=1e-4, progress=False)
    assert log.capped and log.best_epoch == 3 and log.val_losses[-1] < log.val_losses[0]


def test_training_arguments_are_checked_before_any_work():
    model = _patched(eek.Entropy(0.3))
    for kwargs, match in (
        ({"early_stopping": 0}, "early_stopping"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"trains": "everything"}, "trains"),
    ):
        with pytest.raises(ValueError, match=match):
            train_exit_heads(model, _data(), method="deebert", progress=False, **kwargs)
    cache = cache_exit_inputs(model, _data())
    assert isinstance(cache, ExitInputCache) and cache.nbytes() > 0
    with pytest.raises(ValueError, match="cached path only"):
        train_exit_heads(model, cache, method="deebert", cached=False, progress=False)


def test_the_training_settings_are_one_object_its_fields_the_keywords():
    """train_exit_heads takes one TrainSettings, checked when made; its fields as keywords make the same one."""
    model = _patched(eek.Entropy(0.3))
    settings = TrainSettings(method="deebert", epochs=2, lr=1e-3, progress=False)
    torch.manual_seed(0)
    given = train_exit_heads(model, _data(), settings)
    torch.manual_seed(0)
    spread = train_exit_heads(_patched(eek.Entropy(0.3)), _data(), method="deebert", epochs=2, lr=1e-3, progress=False)
    assert list(given) == list(spread) and given.epochs_run == spread.epochs_run == 2
    with pytest.raises(TypeError, match="takes its settings once: settings= or its fields as keywords \\(epochs\\)"):
        train_exit_heads(model, _data(), settings, epochs=3)
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) epoch: its settings's fields are"):
        train_exit_heads(model, _data(), epoch=3)
    with pytest.raises(TypeError, match="settings must be a training.fit_config.TrainSettings, got dict"):
        train_exit_heads(model, _data(), {"epochs": 3})
    # the bounds are FitConfig's, written once (lr=0.0 alone of the rates not positive: measure without learning)
    assert TrainSettings(lr=0.0).lr == 0.0
    for field, value in (("lr", -1.0), ("epochs", 0), ("batch_size", 0)):
        with pytest.raises(FitError, match=f"--{field.replace('_', '-')} must be .* \\({field}=\\), got {value}"):
            TrainSettings(**{field: value})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainSettings(method="no-such-method")


def test_fit_exit_heads_trains_calibrates_and_patches():
    model = tiny_model("bert", num_layers=4)
    result = fit_exit_heads(model, _data(batches=6), _data(batches=2, seed=5), method="heads", progress=False)
    assert eek.policy_of(model) == result.policy and isinstance(result.policy, eek.Entropy)
    assert result.labels and result.validation == "given" and result.calibration.measure == "accuracy"
    assert len(result.stages) == 1 and result.stages[0].log.cached and result.stages[0].objective == "deebert_stage2"
    assert "stage 1: deebert_stage2" in result.summary()
    # without labels: distillation and agreement, validation held out of the training batches
    model = tiny_model("bert", num_layers=4)
    result = fit_exit_heads(model, _data(batches=6), method="heads", labels=False, progress=False)
    assert not result.labels and result.validation == "split" and result.calibration.measure == "agreement"
    assert result.stages[0].objective == "fastbert" and result.calibration.full_accuracy == 1.0
    result = fit_exit_heads(tiny_model("bert", num_layers=4), _data(batches=4), target_layers=2.0, progress=False)
    assert result.calibration.target == "mean layers <= 2" and result.calibration.mean_layers <= 2.0
    with pytest.raises(ValueError, match="not both"):
        fit_exit_heads(tiny_model("bert"), _data(), max_drop=1.0, target_layers=2.0, progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        fit_exit_heads(tiny_model("bert"), _data(batches=4, labels=False), method="pabee", progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_exit_heads(tiny_model("bert"), _data(), method="nope", progress=False)


@pytest.mark.parametrize("method", ["pabee", "smartbert", "joint"])
def test_joint_recipes_run_their_stages(method):
    model = tiny_model("bert", num_layers=4)
    result = fit_exit_heads(model, _data(batches=4), _data(batches=1, seed=5), method=method, progress=False)
    assert [s.trains for s in result.stages] == (["backbone", "heads"] if method == "smartbert" else ["heads", "all"])
    assert [s.log.cached for s in result.stages] == [s.trains == "heads" for s in result.stages]
    assert type(result.policy).__name__ == {"pabee": "Patience", "smartbert": "SkipGates", "joint": "Entropy"}[method]


def test_the_joint_recipe_warm_starts_the_heads_and_trains_them_at_their_own_rate(fine_tuned):
    from earlyexit_kernels.training.recipes import JOINT_HEADS_LR
    from earlyexit_kernels.training.train import parameter_groups

    model = _patched(eek.Entropy(0.3), state=fine_tuned)
    groups = parameter_groups(model, lr=2e-5, heads_lr=JOINT_HEADS_LR)
    heads = {id(p) for p in model.early_exit_heads.parameters()}
    assert [g["lr"] for g in groups] == [2e-5, JOINT_HEADS_LR]
    assert {id(p) for p in groups[1]["params"]} == heads
    assert not heads & {id(p) for p in groups[0]["params"]}

    backbone = {k: v.clone() for k, v in model.state_dict().items() if "early_exit_heads" not in k}
    result = fit_exit_heads(model, _data(batches=4), _data(batches=1, seed=5), method="joint", progress=False)
    joint = result.stages[1]
    assert (joint.objective, joint.trains, joint.log.cached) == ("joint", "all", False)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in backbone.items()), "the backbone learnt"
    # what stays exact: the patched model against its own (jointly trained) backbone, unpatched
    batch = _data(batches=1, seed=9)[0]
    patched = eek.patch(model, eek.Entropy(0.0))  # nothing exits
    with torch.no_grad():
        early = patched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = eek.unpatch(patched)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(early, full, rtol=1e-5, atol=1e-6)


def test_the_automatic_head_choice_keeps_the_configuration_that_reads_the_task():
    """A constructed case: the [CLS] vectors are noise and the mean vectors carry the class, so mean pooling must win."""
    from earlyexit_kernels.training.head_choice import CANDIDATES, choose_heads

    model = _patched(eek.Entropy(0.0))
    generator = torch.Generator().manual_seed(4)

    def cache(rows):
        labels = torch.arange(rows) % 3
        real = cache_exit_inputs(model, _data(batches=1, size=rows))
        signal = torch.nn.functional.one_hot(labels, 3).float().repeat(1, 11)[:, :32] * 3.0
        mean = signal[:, None, :] + 0.3 * torch.randn(rows, 3, 32, generator=generator)
        cls = torch.randn(rows, 3, 32, generator=generator)
        final = torch.nn.functional.one_hot(labels, 3).float() * 5.0
        return ExitInputCache(real.inputs, None, final, labels, {"cls": cls, "mean": mean})

    train, val = cache(96), cache(48)

    def train_heads(train_cache, val_cache, trains=None):
        return train_exit_heads(
            model, train_cache, method="deebert", trains=trains, val_batches=val_cache, progress=False
        )

    chosen, trials, _ = choose_heads(
        model, eek.Entropy(0.0), train, val, train_heads=train_heads, max_drop=1.0, target_layers=None, target="auto"
    )
    assert [(t.pooling, t.head) for t in trials] == list(CANDIDATES)
    by_pooling = {p: min(t.mean_layers for t in trials if t.pooling == p) for p in ("cls", "mean")}
    assert by_pooling["mean"] < 1.5 < 3.5 < by_pooling["cls"]  # the class is in the mean vectors only
    assert chosen.pooling == "mean" and chosen.mean_layers == min(t.mean_layers for t in trials)
    assert eek.head_config(model).pooling == "mean" and eek.head_config(model).head == chosen.head


def test_fit_exit_heads_chooses_the_heads_on_one_pass_of_the_model():
    model = tiny_model("bert", num_layers=4)
    result = fit_exit_heads(
        model, _data(batches=6), _data(batches=2, seed=5), pooling="auto", head="auto", progress=False
    )
    assert result.head_choice == "auto" and len(result.head_trials) == len(CANDIDATES)
    chosen = next(t for t in result.head_trials if t.chosen)
    assert (eek.head_config(model).pooling, eek.head_config(model).head) == (chosen.pooling, chosen.head)
    assert "heads tried (pooling, form" in result.summary()
    # a recipe whose first stage trains the backbone cannot choose from cached vectors: it says so
    joint = fit_exit_heads(
        tiny_model("bert", num_layers=4), _data(batches=4), method="deebert", pooling="auto", progress=False
    )
    assert joint.head_trials == [] and "no automatic choice for deebert" in joint.head_choice
