"""One call from a classifier to a calibrated early-exit model: train with a method's recipe, calibrate, patch.

    from earlyexit_kernels.training import fit_exit_heads
    result = fit_exit_heads(model, train_batches, val_batches, method="heads", max_drop=1.0)
    print(result.summary())          # stages, the calibrated point, warnings
    model(...)                       # patched with result.policy

``eek fit`` runs it through :func:`~earlyexit_kernels.training.fit_texts.fit_model`, with other
defaults (docs/training.md). The recipes are in :mod:`earlyexit_kernels.training.recipes`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from earlyexit_kernels.calibration.candidates import supports_paths
from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.calibration.select import Goal
from earlyexit_kernels.methods.policies import SkipGates
from earlyexit_kernels.patching.patch import patch
from earlyexit_kernels.training.cached_heads import ExitInputCache, cache_exit_inputs, cached_record
from earlyexit_kernels.training.calibrate_model import Calibration, calibrate, record_exits
from earlyexit_kernels.training.fit_config import Training
from earlyexit_kernels.training.head_choice import (
    AUTO,
    candidates_for,
    choose_heads,
    describe_trials,
    inputs_for,
    why_not_auto,
)
from earlyexit_kernels.training.recipes import Recipe, recipe
from earlyexit_kernels.training.train import TrainingLog, train_exit_heads

__all__ = ["FitResult", "HeadBatches", "HeadsFit", "StageResult", "fit_exit_heads", "fit_heads", "split_validation"]


@dataclass
class StageResult:
    """How one stage went: its loss name, what it trained, the learning rate and the
    :class:`~earlyexit_kernels.training.train.TrainingLog` (per-step losses, validation
    losses, epochs run, whether early stopping ended it, cached or not, seconds)."""

    objective: str
    trains: str
    lr: float
    log: TrainingLog

    def describe(self) -> str:
        log = self.log
        path = "cached inputs" if log.cached else "full forward"
        val = f", best val loss {min(log.val_losses):.4f} at epoch {log.best_epoch}" if log.val_losses else ""
        stop = " (stopped early)" if log.stopped_early else ""
        if log.until_plateau:
            stop = f" (until the validation loss stopped falling, {log.lr_reductions} rate cuts)"
        if log.capped:
            stop = " (hit its epoch cap with the validation loss still falling)"
        return (
            f"{self.objective} ({self.trains}, lr {self.lr:g}, {path}): {log.epochs_run} epochs, "
            f"{len(log)} steps, last loss {log[-1]:.4f}{val}{stop}, {log.seconds:.1f} s"
        )


@dataclass
class FitResult:
    """What :func:`fit_exit_heads` did.

    ``method``: the recipe's name; ``policy``: the calibrated policy the model is now patched
    with; ``calibration``: the :class:`~earlyexit_kernels.training.calibrate_model.Calibration`
    on the validation data (its ``curve``, ``accuracy``, ``mean_layers``, ``full_accuracy``,
    ``warnings``, ``heads_at_chance``, ``saves_little``); ``stages``: one
    :class:`StageResult` per training stage; ``labels``: whether labels were used (False:
    self-distillation and agreement); ``validation``: ``"given"`` or ``"split"`` (the last
    ``validation_fraction`` of the training batches); ``calibrated_on``: ``"validation"`` or
    ``"calibration"`` (separate rows, kept out of training and early stopping);
    ``seconds``: wall-clock of the call; ``validation_full_accuracy``: the full model's accuracy
    on the labelled validation rows (None without labels, or when no cached pass read them).
    """

    method: str
    policy: object
    calibration: Calibration
    stages: list[StageResult] = field(default_factory=list)
    labels: bool = True
    validation: str = "given"
    seconds: float = 0.0
    calibrated_on: str = "validation"
    head_trials: list = field(default_factory=list)
    head_choice: str = "given"
    validation_full_accuracy: float | None = None

    @property
    def warnings(self) -> list[str]:
        capped = [
            f"stage {i} ({stage.objective}) stopped at its cap of {stage.log.epochs_run} epochs with the validation "
            f"loss still falling ({stage.log.val_losses[0]:.4f} -> {stage.log.val_losses[-1]:.4f}): train longer "
            f"(epochs=None trains heads until it stops falling)"
            for i, stage in enumerate(self.stages, 1)
            if stage.log.capped
        ]
        return capped + self.calibration.warnings

    def summary(self) -> str:
        lines = [f"method {self.method}: {'labels' if self.labels else 'no labels (self-distillation)'}"]
        lines += [f"  stage {i}: {s.describe()}" for i, s in enumerate(self.stages, 1)]
        if self.head_trials:
            lines += describe_trials(self.head_trials, self.calibration.measure, self.calibration.num_layers)
        lines.append(self.calibration.summary())
        lines.append(f"fit took {self.seconds:.1f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class HeadsFit:
    """The settings of one :func:`fit_exit_heads`, one object: the ``training``
    (:class:`~earlyexit_kernels.training.fit_config.Training`: the recipe, the heads, epochs, lr, seed, progress), the
    calibration's ``goal`` (:class:`~earlyexit_kernels.calibration.select.Goal`), each checked where it is made, and
    ``labels`` (None: used where the batches have them), ``validation_fraction`` (held out of the training batches
    where no validation batches come), ``backend`` (``eek.patch``'s) and ``verbose`` (the calibration's curve
    printed); :func:`fit_exit_heads` says what each does."""

    training: Training = Training(pooling=None, head=None, progress=True)
    goal: Goal = Goal(max_drop=1.0)
    labels: bool | None = None
    validation_fraction: float = 0.15
    backend: str = "auto"
    verbose: bool = False


@dataclass(frozen=True)
class HeadBatches:
    """The rows of one :func:`fit_exit_heads`: ``train`` and ``validation`` (None: split from ``train``),
    ``calibration`` (None: the validation rows) and ``unlabelled`` (more calibration rows, without labels), each a
    list or ``DataLoader`` of batches, or None."""

    train: object
    validation: object = None
    calibration: object = None
    unlabelled: object = None


def _as_list(batches) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(batches, Mapping):
        return [batches]
    if isinstance(batches, Iterator):
        return list(batches)
    return batches


def _has_labels(batches) -> bool:
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("fit_exit_heads got no training batches")
    return first.get("labels") is not None


def _without_labels(batches) -> list[dict]:
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]


def _against(reference, record: ExitRecord, batches) -> ExitRecord:
    """``record`` of ``batches``' rows with its risks measured against ``reference``'s full depth on the same rows."""
    return record.against(record_exits(reference, batches).all_logits[-1])


def split_validation(batches, fraction: float = 0.15) -> tuple[list, list]:
    """``(train, validation)``: the last ``fraction`` of ``batches`` (at least one batch) held out."""
    batches = list(batches)
    if len(batches) < 2:
        raise ValueError(
            f"fit_exit_heads needs validation data: pass val_batches, or at least 2 training batches to hold "
            f"some out (got {len(batches)})"
        )
    held = min(len(batches) - 1, max(1, math.ceil(fraction * len(batches))))
    return batches[:-held], batches[-held:]


def fit_exit_heads(
    model,
    train_batches,
    val_batches=None,
    *,
    method: str = "heads",
    labels: bool | None = None,
    max_drop: float | None = None,
    target_layers: float | None = None,
    target: str = "auto",
    epochs: int | None = None,
    lr: float | None = None,
    validation_fraction: float = 0.15,
    min_saving: float = 0.10,
    backend: str = "auto",
    progress: bool = True,
    verbose: bool = False,
    seed: int = 0,
    calibration_batches=None,
    confidence: float | None = None,
    pooling: str | None = None,
    head: str | None = None,
    unlabelled_batches=None,
    guarantee: str = "probable",
    max_changed: float | None = None,
    reference=None,
) -> FitResult:
    """Train the exit heads of ``model`` with ``method``'s recipe, calibrate on validation data, patch.

    ``model``: a Hugging Face sequence classifier (patched or not; unpatched, it is patched
    here with the recipe's policy and the family's default heads; patched, its heads' pooling
    and form are kept and the recipe's policy is swapped in). ``train_batches`` and
    ``val_batches``: lists (or ``DataLoader``s) of dicts with ``input_ids`` [B, T] and
    optionally ``attention_mask``, ``token_type_ids`` [B, T] and ``labels`` [B]. Without
    ``val_batches`` the last ``validation_fraction`` of the training batches is held out
    (``result.validation == "split"``). ``method``: a name of
    :data:`~earlyexit_kernels.training.recipes.RECIPES`: ``"heads"`` (default: head-only on the
    frozen model, the cached path, seconds to minutes), ``"fastbert"``, ``"deebert"``,
    ``"pabee"``, ``"palbert"``, ``"ensemble"``, ``"dact"``, ``"smartbert"`` (the joint ones run
    full forwards and take an epoch of the model per joint stage).

    ``labels``: None uses them when the batches have them; False ignores them: the head
    stages distil the final classifier (``fastbert``) and calibration measures agreement with
    the full model; a recipe with a stage that needs labels raises ``ValueError``.
    ``max_drop`` (points; 1.0 when neither is given) or ``target_layers`` chooses the calibrated point;
    ``target``: ``"auto"``, ``"accuracy"`` or ``"agreement"`` (see
    :func:`~earlyexit_kernels.training.calibrate_model.calibrate`, like ``min_saving``). ``epochs``
    and ``lr`` override every head-only stage's defaults (None: the recipe's). Early stopping
    on the validation loss applies to every stage. ``backend``: passed to ``eek.patch``.
    ``calibration_batches``: rows for the calibration only (default: the validation rows,
    which early stopping has also seen); ``confidence``: certify ``max_drop`` with that
    confidence (:func:`~earlyexit_kernels.training.calibrate_model.calibrate`; ``guarantee``: ``"probable"`` or
    ``"expected"``, what the certificate promises); the guarantee
    assumes calibration rows that no training step saw, so pass ``calibration_batches``;
    ``unlabelled_batches``: more such rows, without labels, in the certificate beside them.
    ``max_changed`` (points, with ``confidence`` and labelled rows): the answers changed against the full model,
    certified beside ``max_drop`` (:func:`~earlyexit_kernels.training.calibrate_model.calibrate`).
    ``reference``: where ``model`` runs on another base than the one the user validated (``eek fit --dtype
    int8``: its encoder layers int8), that model (patched, on its own base), whose full depth the calibration
    measures the risk against: accuracy lost against its answers' accuracy, or disagreement with them; the
    base's own changes and the exits' count together against ``max_drop``. Head-only recipes only (the
    base's layers learn nothing). None: ``model``'s own full depth.
    ``pooling`` / ``head``: the heads' (``"cls"``/``"mean"``, ``"model"``/``"mlp"``/``"cascade"``; None: the
    model's, see ``eek.patch``), or ``"auto"``: trained in every configuration on one cached pass
    of the model and chosen on the validation rows
    (:mod:`earlyexit_kernels.training.head_choice`; ``result.head_trials``), for recipes whose
    first stage trains the heads alone and whose policy has no halting head (else the model's).
    Returns a :class:`FitResult`; the model is left patched with the calibrated policy, in
    eval mode.
    """
    if max_drop is None and target_layers is None:
        max_drop = 1.0
    settings = HeadsFit(  # every setting checked here, before anything trains
        training=Training(
            method=method, pooling=pooling, head=head, epochs=epochs, lr=lr, seed=seed, progress=progress
        ),
        goal=Goal(
            max_drop=max_drop,
            target_layers=target_layers,
            target=target,
            min_saving=min_saving,
            confidence=confidence,
            guarantee=guarantee,
            max_changed=max_changed,
        ),
        labels=labels,
        validation_fraction=validation_fraction,
        backend=backend,
        verbose=verbose,
    )
    batches = HeadBatches(train_batches, val_batches, calibration_batches, unlabelled_batches)
    return fit_heads(model, batches, settings, reference=reference)


def fit_heads(model, batches: HeadBatches, settings: HeadsFit, *, reference=None) -> FitResult:
    """:func:`fit_exit_heads` with its settings as one :class:`HeadsFit` and its rows as :class:`HeadBatches`
    (what :func:`~earlyexit_kernels.training.fit_texts.fit_model` builds from a
    :class:`~earlyexit_kernels.training.fit_config.FitConfig`); ``reference`` as there."""
    started = time.perf_counter()
    training, goal = settings.training, settings.goal
    chosen: Recipe = recipe(training.method)
    pooling, head, progress, seed = training.pooling, training.head, training.progress, training.seed
    if reference is not None and chosen.encoder_stages:
        raise ValueError(
            f"the {chosen.name} recipe trains the encoder too, which a model on another base than its reference "
            "cannot learn: fit it on its own base (reference=None), or use method='heads' or 'fastbert'"
        )
    train_batches = _as_list(batches.train)
    labels = settings.labels
    use_labels = _has_labels(train_batches) if labels is None else bool(labels)
    if use_labels and not _has_labels(train_batches):
        raise ValueError("labels=True but the training batches have no 'labels'")
    validation = "given"
    val_batches = batches.validation
    if val_batches is None:
        train_batches, val_batches = split_validation(train_batches, settings.validation_fraction)
        validation = "split"
    val_batches = _as_list(val_batches)
    calibrated_on = "validation" if batches.calibration is None else "calibration"
    calibration_batches = val_batches if batches.calibration is None else _as_list(batches.calibration)
    if not use_labels:
        if chosen.needs_labels:
            stage = next(s for s in chosen.stages if s.unlabelled is None)
            raise ValueError(
                f"the {chosen.name} recipe has a stage that needs labels ({stage.objective}); without labels use "
                f"method='heads' or 'fastbert' (self-distillation from the final classifier)"
            )
        train_batches, val_batches = _without_labels(train_batches), _without_labels(val_batches)
        calibration_batches = _without_labels(calibration_batches)
        if goal.target == "auto":
            goal = dataclasses.replace(goal, target="agreement")

    policy = chosen.make_policy()
    given = {k: v for k, v in (("pooling", pooling), ("head", head)) if v not in (None, AUTO)}
    # a patched model keeps its heads (pooling, form) unless told otherwise, and takes the recipe's policy
    patch(model, policy, settings.backend, **given)
    trying = candidates_for(pooling, head)
    head_choice = "given"
    if trying:
        reason = why_not_auto(chosen.stages[0].trains, policy)
        head_choice = (
            "auto" if reason is None else f"the model's heads: no automatic choice for {chosen.name} ({reason})"
        )
        if reason is not None:
            trying = ()
    trials = []
    stages = []
    caches: dict[str, ExitInputCache] = {}
    for index, stage in enumerate(chosen.stages):
        name = stage.objective if use_labels else stage.unlabelled
        head_only = stage.trains == "heads"
        stage_lr = training.lr if (training.lr is not None and head_only) else stage.lr
        stage_epochs = training.epochs if (training.epochs is not None and head_only) else stage.epochs
        if head_only and "train" not in caches:
            # one pass of the frozen model serves the head-only stage and the calibration after it
            both = bool(trying) and index == 0
            caches["train"] = cache_exit_inputs(
                model, train_batches, progress=progress, description="caching train", both_poolings=both
            )
            caches["val"] = cache_exit_inputs(
                model, val_batches, progress=progress, description="caching validation", both_poolings=both
            )
            if calibrated_on == "calibration":
                caches["calibration"] = cache_exit_inputs(
                    model, calibration_batches, progress=progress, description="caching calibration", both_poolings=both
                )
            else:
                caches["calibration"] = caches["val"]

        def train(
            train_data, val_data, trains=None, name=name, stage=stage, stage_lr=stage_lr, stage_epochs=stage_epochs
        ):
            return train_exit_heads(
                model,
                train_data,
                method=name,
                trains=trains or stage.trains,
                lr=stage_lr,
                epochs=stage_epochs,
                loss_kwargs=stage.loss_kwargs,
                heads_lr=stage.heads_lr,
                val_batches=val_data,
                progress=progress,
                seed=seed,
            )

        if trying and index == 0:
            picked, trials, log = choose_heads(
                model,
                policy,
                caches["train"],
                caches["val"],
                candidates=trying,
                train_heads=train,
                max_drop=goal.max_drop,
                target_layers=goal.target_layers,
                target=goal.target,
            )
            caches = {key: inputs_for(model, cache, picked.pooling, picked.head) for key, cache in caches.items()}
        elif head_only:
            log = train(caches["train"], caches["val"])
        else:
            log = train(train_batches, val_batches)
        stages.append(StageResult(name, stage.trains, log.lr, log))
        if not head_only:
            caches.clear()  # the backbone learnt: what the heads read has changed
    model.eval()
    validation_full_accuracy = None
    if use_labels and "val" in caches and caches["val"].labels is not None:
        val = caches["val"]
        validation_full_accuracy = float((val.final_logits.argmax(-1) == val.labels).double().mean())
    if "calibration" in caches and not isinstance(policy, SkipGates):
        record = cached_record(model, caches["calibration"])
    else:
        record = record_exits(model, calibration_batches)
    unlabelled_batches = batches.unlabelled
    unlabelled = None if unlabelled_batches is None else record_exits(model, unlabelled_batches)
    if reference is not None:
        record = _against(reference, record, calibration_batches)
        unlabelled = None if unlabelled is None else _against(reference, unlabelled, unlabelled_batches)
    path_record = None
    if goal.confidence is not None and calibrated_on == "calibration" and supports_paths(policy):
        # the path of candidates is chosen on the validation rows, apart from the calibration rows
        path_record = cached_record(model, caches["val"]) if "val" in caches else record_exits(model, val_batches)
    calibration = calibrate(record, goal=goal, verbose=settings.verbose, path_record=path_record, unlabelled=unlabelled)
    patch(model, calibration.policy, settings.backend)
    return FitResult(
        method=chosen.name,
        policy=calibration.policy,
        calibration=calibration,
        stages=stages,
        labels=use_labels,
        validation=validation,
        seconds=time.perf_counter() - started,
        calibrated_on=calibrated_on,
        head_trials=trials,
        head_choice=head_choice,
        validation_full_accuracy=validation_full_accuracy,
    )
