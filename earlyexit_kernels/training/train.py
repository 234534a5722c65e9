"""Training the exit heads: a self-contained loop over the losses of :mod:`earlyexit_kernels.methods.losses`.

Every loss works on what a patched model returns in training mode (or with
``return_all_exits=True``):

    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    loss = pabee_loss(out.all_logits, labels)

:func:`train_exit_heads` is a small loop around them (one method per call; DeeBERT
and SmartBERT are two calls, one per stage). Inside a Hugging Face ``Trainer``, choose
the loss with ``eek.set_training_objective(model, method)`` instead: the patched
forward then returns it as ``outputs.loss`` in training mode.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from earlyexit_kernels.methods.losses import ALIASES, OBJECTIVES, objective
from earlyexit_kernels.patching.patch import check_objective_policy, is_patched, policy_of
from earlyexit_kernels.training.cached_heads import ExitInputCache, cache_exit_inputs, cache_reason, cached_exits
from earlyexit_kernels.training.fit_config import HALTING_LR, OPTIMIZERS, SCHEDULES, TrainSettings, settings_of
from earlyexit_kernels.training.fit_config import TRAINS as _TRAINS

__all__ = [
    "freeze_backbone",
    "select_trainable",
    "parameter_groups",
    "train_exit_heads",
    "TrainingLog",
    "default_lr",
    "DEFAULT_LR",
    "DEFAULT_EPOCHS",
    "PLATEAU",
    "TrainingWarning",
    "OBJECTIVE_NAMES",
    "HALTING_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainSettings",
]

#: the loss names :func:`train_exit_heads` takes as ``method`` (those of
#: :data:`~earlyexit_kernels.methods.losses.OBJECTIVES` and their aliases); the fit methods are
#: :data:`earlyexit_kernels._method_names.METHODS`
OBJECTIVE_NAMES = tuple(OBJECTIVES) + tuple(ALIASES)
#: the learning rate of each ``trains`` mode when none is given. The heads alone start from
#: the final classifier's weights on inputs they were not trained for and must move far:
#: at 2e-5 (a fine-tuning rate) the internal heads of a fine-tuned MiniLM-L6 stayed at
#: chance on Rotten Tomatoes (docs/training.md has the sweep).
DEFAULT_LR = {"heads": 1e-3, "all": 2e-5, "backbone": 2e-5, "below": 1e-3}
#: the number of epochs when none is given: on cached exit inputs an epoch costs
#: milliseconds to seconds, through the forward it costs a pass of the model.
DEFAULT_EPOCHS = {"cached": 30, "forward": 1}
#: ``epochs=None`` on cached inputs with validation data trains until the validation loss
#: stops falling, not for a fixed count: ``patience`` epochs without a relative improvement of
#: ``min_improvement`` divide the rate by ``1 / factor`` (from the best epoch's heads), and the
#: plateau after ``reductions`` such cuts ends the training; ``cap`` epochs at most. A fixed
#: count is too few on 1,000 rows (30 steps an epoch) and too many on 100,000.
PLATEAU = {"patience": 2, "min_improvement": 1e-3, "factor": 0.1, "reductions": 2, "cap": 300}


class TrainingWarning(UserWarning):
    """The training ended at its epoch cap while the validation loss was still falling."""


def freeze_backbone(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the exit heads of layers ``1..L-1`` (DeeBERT stage 2); returns the trainable ones."""
    if not is_patched(model):
        raise ValueError("freeze_backbone needs a model patched with eek.patch")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = list(model.early_exit_heads.classifiers.parameters())
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


def _heads_parameters(model) -> list[nn.Parameter]:
    """The internal classifiers and halting heads (not the gates)."""
    heads = model.early_exit_heads
    gates = {id(p) for p in heads.gates.parameters()} if heads.gates is not None else set()
    return [p for p in heads.parameters() if id(p) not in gates]


def _below_parameters(model) -> list[nn.Parameter]:
    """The maps of the head below of ``head="cascade"`` heads (``CascadeExitHead.below``)."""
    return [head.below.weight for head in model.early_exit_heads.classifiers if hasattr(head, "below")]


def _halting_parameters(model) -> list[nn.Parameter]:
    """The halting heads (QExit's Lambda layer, DACT's linear head) and SmartBERT's gates."""
    heads = model.early_exit_heads
    modules = [heads.qexit_halting, heads.dact_halting, heads.gates]
    return [p for module in modules if module is not None for p in module.parameters()]


def parameter_groups(
    model: nn.Module,
    lr: float,
    halting_lr: float | None = HALTING_LR,
    parameters: list[nn.Parameter] | None = None,
    heads_lr: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups: the halting heads and gates at ``halting_lr``, the internal exit
    heads at ``heads_lr``, the rest at ``lr`` (``None``: ``lr``).

    ``parameters``: the trainable ones (default: those of ``model`` that require grad).
    For an optimizer of your own, e.g. a ``Trainer``'s:
    ``Trainer(..., optimizers=(torch.optim.AdamW(parameter_groups(model, lr=2e-5)), None))``.
    """
    if not is_patched(model):
        raise ValueError("parameter_groups needs a model patched with eek.patch")
    if parameters is None:
        parameters = [p for p in model.parameters() if p.requires_grad]
    every_halting = {id(p) for p in _halting_parameters(model)}
    halting = every_halting if halting_lr is not None else set()
    heads = {id(p) for p in _heads_parameters(model)} - every_halting if heads_lr is not None else set()
    groups = (
        {"params": [p for p in parameters if id(p) not in halting and id(p) not in heads], "lr": lr},
        {"params": [p for p in parameters if id(p) in heads], "lr": heads_lr},
        {"params": [p for p in parameters if id(p) in halting], "lr": halting_lr},
    )
    return [group for group in groups if group["params"]]


def select_trainable(model: nn.Module, trains: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for one of ``"all"``, ``"heads"``, ``"backbone"``, ``"below"``; returns the
    trainable parameters.

    ``"heads"``: the internal classifiers of layers ``1..L-1`` and the halting heads
    (backbone, final classifier and gates frozen). ``"backbone"``: the backbone, the
    final classifier and the skip gates (internal classifiers and halting heads frozen).
    ``"all"``: everything. ``"below"``: the maps ``B_i`` of ``head="cascade"`` heads alone,
    on the MLPs under them as they are (heads trained as ``"mlp"`` learning to read the head below).
    """
    if not is_patched(model):
        raise ValueError("select_trainable needs a model patched with eek.patch")
    if trains not in _TRAINS:
        raise ValueError(f"trains must be one of {', '.join(_TRAINS)}; got {trains!r}")
    if trains == "below":
        below = _below_parameters(model)
        if not below:
            raise ValueError(
                f'trains="below" trains the maps of heads that read the head below; these heads are '
                f'head="{model.early_exit_heads.form}": patch with head="cascade"'
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in below:
            parameter.requires_grad_(True)
        return below
    heads = {id(p) for p in _heads_parameters(model)}
    for parameter in model.parameters():
        if trains == "all":
            flag = True
        else:
            flag = (id(parameter) in heads) == (trains == "heads")
        parameter.requires_grad_(flag)
    return [p for p in model.parameters() if p.requires_grad]


def _batches(data) -> Iterable[Mapping[str, torch.Tensor]]:
    if isinstance(data, Mapping):
        yield data
    else:
        yield from data


def _optimizer(name: str, groups: list[dict], weight_decay: float):
    """``groups``: parameter groups, each with its ``lr``."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)


def _schedule(name: str, total: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


class TrainingLog(list):
    """The loss of every training step (a list of floats), and how the training went.

    ``val_losses``: the validation loss after every epoch (empty without validation data);
    ``best_epoch``: the 1-based epoch whose heads were kept (the last one without validation
    data); ``stopped_early``: whether early stopping ended the training before ``epochs``;
    ``epochs_run``; ``cached``: whether the fast path trained on cached exit inputs;
    ``lr``: the learning rate used; ``seconds``: the wall-clock time of the call;
    ``until_plateau``: trained until the validation loss stopped falling (:data:`PLATEAU`),
    ``lr_reductions``: the rate cuts made on its plateaus; ``capped``: ended at the epoch cap
    with the validation loss still falling (a :class:`TrainingWarning` said so).
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.val_losses: list[float] = []
        self.best_epoch = 0
        self.stopped_early = False
        self.epochs_run = 0
        self.cached = False
        self.lr = 0.0
        self.seconds = 0.0
        self.until_plateau = False
        self.lr_reductions = 0
        self.capped = False


def default_lr(trains: str) -> float:
    """The learning rate :func:`train_exit_heads` uses for ``trains`` when none is given (:data:`DEFAULT_LR`)."""
    if trains not in DEFAULT_LR:
        raise ValueError(f"trains must be one of {', '.join(_TRAINS)}; got {trains!r}")
    return DEFAULT_LR[trains]


def train_exit_heads(
    model: nn.Module,
    batches,
    settings: TrainSettings | None = None,
    *,
    val_batches=None,
    **fields,
) -> TrainingLog:
    """Train a patched model with one method's loss; returns the loss of every step (a :class:`TrainingLog`).

    ``settings``: a :class:`~earlyexit_kernels.training.fit_config.TrainSettings` (every field below, checked
    once when it is made); its fields may be given as keywords instead
    (``train_exit_heads(model, batches, method="pabee", epochs=3)`` is
    ``train_exit_heads(model, batches, TrainSettings(method="pabee", epochs=3))``), not both.

    ``batches``: a re-iterable of dicts with ``input_ids``, ``labels`` and optionally
    ``attention_mask`` and ``token_type_ids`` (a list or a ``DataLoader``; ``labels`` may be
    left out for ``"fastbert"``, which distils the final classifier). A one-shot iterator (a
    generator) is read into memory; without the cached path it trains one epoch, and with
    ``epochs > 1`` it raises ``ValueError``, as does an epoch that finds no batches.
    ``method``: a name of :data:`earlyexit_kernels.methods.losses.OBJECTIVES` (``"pabee"``,
    ``"deebert_stage1"``, ``"deebert_stage2"`` (alias ``"deebert"``), ``"fastbert"``,
    ``"palbert"`` (alias ``"pondernet"``), ``"ensemble"``, ``"dact"``, ``"smartbert_stage1"``,
    ``"smartbert_stage2"``). ``"palbert"`` needs the model patched with ``eek.QExit``,
    ``"dact"`` with ``eek.DACT`` and ``"smartbert_stage1"`` with ``eek.SkipGates`` (their
    halting head or gates). ``trains``: which parameters learn, ``"all"`` (joint),
    ``"heads"`` (head-only) or ``"backbone"``; by default the method's own (see
    :func:`select_trainable`); the others are frozen during the loop and their
    ``requires_grad`` is restored after.

    Defaults that converge (``docs/training.md`` has the measurements): ``lr=None`` is
    :data:`DEFAULT_LR` of the ``trains`` mode (1e-3 for the heads alone, 2e-5 when the
    backbone learns); ``epochs=None`` is :data:`DEFAULT_EPOCHS` (30 on the cached path, 1
    through the forward). ``lr=0.0`` is the one rate that is not positive: the epochs run without learning, so
    that the returned losses measure the model as it is (the fits take positive rates only:
    :class:`~earlyexit_kernels.training.fit_config.FitConfig`).

    Cached fast path (:mod:`earlyexit_kernels.training.cached_heads`): when only the exit
    heads learn (``trains="heads"``, or a method whose own mode it is), the frozen model runs
    once over ``batches`` (and ``val_batches``) and every epoch trains the internal heads (and
    the halting head of QExit or DACT) on the cached inputs, in shuffled batches of
    ``batch_size`` rows (default: the size of the first batch; ``seed`` fixes the order).
    ``cached=None`` takes it where it is valid, ``True`` requires it (``ValueError`` saying why
    not), ``False`` trains through the forward. ``batches`` and ``val_batches`` may also be an
    :class:`~earlyexit_kernels.training.cached_heads.ExitInputCache` made by
    ``cache_exit_inputs(model, batches)`` (to train several times on one pass of the model;
    the default ``batch_size`` is then 32).

    Early stopping: with ``val_batches`` (the same form as ``batches``), the method's loss on
    them is measured after every epoch (eval mode); the training stops after
    ``early_stopping`` epochs without a lower loss (None: never) and the trainable parameters
    of the best epoch are restored. Without validation data the schedule ends the training:
    linear warm-up over ``warmup_fraction`` of the steps, then ``"linear"`` decay to zero,
    ``"cosine"`` decay or ``"constant"``. ``optimizer``: ``"adamw"``, ``"adam"`` or ``"sgd"``
    (momentum 0.9).

    ``halting_lr``: the learning rate of the halting heads (QExit, DACT) and SmartBERT's
    gates when they train (:data:`HALTING_LR`, 3e-3, by default; ``None``: ``lr`` like the
    rest). They start from a constant output and must move far (see :data:`HALTING_LR`);
    at the backbone's rate DACT's head barely moves and DACT runs nearly every layer.
    ``heads_lr``: the internal exit heads' own rate when the backbone learns too (None: ``lr``);
    heads warm-started by a head-only stage need more than the backbone's fine-tuning rate. The
    schedule scales every rate alike.
    ``loss_kwargs`` go to the loss (``beta=``, ``tau=``, ``lam=``, ``diversity=``).
    ``progress``: a tqdm bar on a terminal.
    """
    started = time.perf_counter()
    settings = settings_of(TrainSettings, settings, fields, who="train_exit_heads", what="settings")
    chosen = objective(settings.method)
    if not is_patched(model):
        raise ValueError("train_exit_heads needs a model patched with eek.patch")
    chosen.check_head(model.config.num_labels)
    check_objective_policy(chosen, policy_of(model))
    trains = settings.trains or chosen.trains
    epochs, cached, progress = settings.epochs, settings.cached, settings.progress
    lr = default_lr(trains) if settings.lr is None else settings.lr
    one_shot = isinstance(batches, Iterator)
    if one_shot:
        batches = list(batches)  # a generator can be read once: held in memory
    if isinstance(val_batches, Iterator):
        val_batches = list(val_batches)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    loss_kwargs = dict(settings.loss_kwargs or {})
    was_training = model.training
    log = TrainingLog()
    log.lr = lr
    try:
        parameters = select_trainable(model, trains)
        reason = cache_reason(model, chosen, parameters)
        if reason is not None and (isinstance(batches, ExitInputCache) or isinstance(val_batches, ExitInputCache)):
            raise ValueError(f"batches is an ExitInputCache, but the {chosen.name} loss cannot train on it: {reason}")
        if cached is False and isinstance(batches, ExitInputCache):
            raise ValueError("batches is an ExitInputCache: it trains on the cached path only (cached=None or True)")
        if cached and reason is not None:
            raise ValueError(f"cached=True but the cached path cannot train the {chosen.name} loss here: {reason}")
        log.cached = reason is None and cached is not False
        log.until_plateau = epochs is None and log.cached and val_batches is not None
        if epochs is None:
            epochs = PLATEAU["cap"] if log.until_plateau else DEFAULT_EPOCHS["cached" if log.cached else "forward"]
        if one_shot and epochs > 1 and not log.cached:
            raise ValueError(
                f"batches is a one-shot iterator (a generator): it can be read only once, so "
                f"epochs={epochs} would train on nothing after the first epoch; pass a list or a DataLoader "
                f"(re-iterable), or epochs=1"
            )
        if log.cached:
            source = _CachedSource(model, batches, val_batches, settings.batch_size, settings.seed, progress)
        else:
            source = _ForwardSource(model, batches, val_batches)
        steps_per_epoch = source.steps_per_epoch
        if steps_per_epoch == 0:
            raise ValueError("train_exit_heads got no batches: batches is empty (or an iterable already read)")
        total = max(1, steps_per_epoch * epochs)
        groups = parameter_groups(model, lr, settings.halting_lr, parameters, settings.heads_lr)
        opt = _optimizer(settings.optimizer, groups, settings.weight_decay)
        if log.until_plateau:  # warm-up over a tenth of an epoch, then constant, cut on plateaus
            warmup = int(steps_per_epoch * settings.warmup_fraction)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule("constant", total, warmup))
        else:
            warmup = int(total * settings.warmup_fraction)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(settings.schedule, total, warmup))
        threads = torch.get_num_threads()
        if log.cached and next(model.parameters()).device.type == "cpu":
            # the heads' steps are small matrix products: on the CPU more threads only add
            # synchronisation: on the shared 2-core machine (load 6.5) a step of MLP heads on 32 rows
            # took 460-505 ms with 2 threads and 33 ms with one
            torch.set_num_threads(1)
        loop = EpochLoop(loss_kwargs, epochs, settings.max_grad_norm, settings.early_stopping, progress)
        try:
            _train_epochs(model, chosen, source, (opt, scheduler, parameters), log, loop)
        finally:
            torch.set_num_threads(threads)
    finally:
        model.train(was_training)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    log.seconds = time.perf_counter() - started
    return log


@dataclass(frozen=True)
class EpochLoop:
    """What the training loop is asked for, resolved by :func:`train_exit_heads` from its keywords: the loss's
    ``loss_kwargs``, the ``epochs`` (a number), ``max_grad_norm``, ``early_stopping`` (epochs without a lower
    validation loss; None: never) and ``progress``."""

    loss_kwargs: dict
    epochs: int
    max_grad_norm: float
    early_stopping: int | None
    progress: bool


def _train_epochs(model, chosen, source, optimizing, log, loop: EpochLoop) -> None:
    """The loop: ``loop.epochs`` passes over ``source``, with early stopping on its validation loss;
    ``optimizing``: the optimizer, its schedule and the parameters it trains."""
    opt, scheduler, parameters = optimizing
    loss_kwargs, epochs, max_grad_norm = loop.loss_kwargs, loop.epochs, loop.max_grad_norm
    early_stopping, progress = loop.early_stopping, loop.progress
    bar = _progress(source.steps_per_epoch * epochs, f"training ({chosen.name})", progress)
    best_loss, best_state, since_best, reference = math.inf, None, 0, math.inf
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            steps_before = len(log)
            for out, labels in source.epoch(epoch):
                loss = chosen(out, labels, **loss_kwargs)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the {chosen.name} loss is {loss.item()} at step {len(log)}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                opt.step()
                scheduler.step()
                log.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if len(log) == steps_before:
                raise ValueError(
                    f"epoch {epoch} of {epochs} found no batches ({source.steps_per_epoch} when they were counted "
                    f"before the training): batches must give the same batches on every pass; pass a list or a "
                    f"DataLoader"
                )
            log.epochs_run = epoch
            if not source.has_validation:
                log.best_epoch = epoch
                continue
            model.eval()
            val_loss = source.validation_loss(chosen, loss_kwargs)
            log.val_losses.append(val_loss)
            bar.set_postfix(loss=f"{log[-1]:.4f}", val=f"{val_loss:.4f}")
            needed = PLATEAU["min_improvement"] if log.until_plateau else 1e-6
            significant = best_state is None or val_loss < reference - needed * abs(reference)
            if best_state is None or val_loss < best_loss:  # the heads kept are the lowest loss's
                best_loss, log.best_epoch = val_loss, epoch
                best_state = [p.detach().clone() for p in parameters]
            if significant:  # a plateau is a run of epochs without a significant improvement
                reference, since_best = val_loss, 0
            elif log.until_plateau:
                since_best += 1
                if since_best >= PLATEAU["patience"]:
                    if log.lr_reductions == PLATEAU["reductions"]:
                        log.stopped_early = epoch < epochs
                        break
                    log.lr_reductions += 1
                    since_best = 0
                    scheduler.base_lrs = [rate * PLATEAU["factor"] for rate in scheduler.base_lrs]
                    with torch.no_grad():  # carry on from the best heads at the lower rate
                        for parameter, value in zip(parameters, best_state):
                            parameter.copy_(value)
            else:
                since_best += 1
                if early_stopping is not None and since_best >= early_stopping:
                    log.stopped_early = epoch < epochs
                    break
    finally:
        bar.close()
    _warn_if_capped(log, epochs)
    if best_state is not None and log.best_epoch != log.epochs_run:
        with torch.no_grad():
            for parameter, value in zip(parameters, best_state):
                parameter.copy_(value)


def _warn_if_capped(log: TrainingLog, epochs: int) -> None:
    """Warn when the last epoch still lowered the validation loss: the cap, not a plateau, ended it."""
    losses = log.val_losses
    if log.stopped_early or len(losses) < 2 or log.best_epoch != log.epochs_run or log.epochs_run < epochs:
        return
    log.capped = True
    recent = losses[-min(len(losses), 5)]
    warnings.warn(
        f"train_exit_heads: the training stopped at its cap of {epochs} epochs with the validation loss still "
        f"falling ({losses[0]:.4f} after epoch 1, {recent:.4f} {min(len(losses), 5) - 1} epochs before the end, "
        f"{losses[-1]:.4f} at the end): train longer (epochs=None trains until it stops falling, at most "
        f"{PLATEAU['cap']} epochs on cached inputs)",
        TrainingWarning,
        stacklevel=3,
    )


class _ForwardSource:
    """Training batches through the model's forward (every layer on every row, in training mode)."""

    def __init__(self, model, batches, val_batches):
        self.model, self.batches, self.val_batches = model, batches, val_batches
        self.steps_per_epoch = sum(1 for _ in _batches(batches))
        self.has_validation = val_batches is not None

    def _forward(self, batch):
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
            return_all_exits=True,
        )

    def epoch(self, epoch: int):
        for batch in _batches(self.batches):
            yield self._forward(batch), batch.get("labels")

    @torch.no_grad()
    def validation_loss(self, chosen, loss_kwargs) -> float:
        total, rows = 0.0, 0
        for batch in _batches(self.val_batches):
            n = batch["input_ids"].shape[0]
            total += chosen(self._forward(batch), batch.get("labels"), **loss_kwargs).item() * n
            rows += n
        if rows == 0:
            raise ValueError("val_batches holds no rows")
        return total / rows


def _as_cache(model, batches, progress: bool, description: str) -> ExitInputCache:
    if isinstance(batches, ExitInputCache):
        if batches.num_layers != model.config.num_hidden_layers:
            raise ValueError(
                f"the cache holds {batches.num_layers} layers but the model has {model.config.num_hidden_layers}"
            )
        return batches
    return cache_exit_inputs(model, batches, progress=progress, description=description)


class _CachedSource:
    """Training batches of cached exit inputs: the frozen model ran once over the data."""

    def __init__(self, model, batches, val_batches, batch_size, seed, progress):
        self.model = model
        self.train = _as_cache(model, batches, progress, "caching exit inputs")
        self.val = None
        if val_batches is not None:
            self.val = _as_cache(model, val_batches, progress, "caching validation")
        if batch_size is None:
            batch_size = 32
            if not isinstance(batches, ExitInputCache):
                batch_size = int(next(iter(_batches(batches)))["input_ids"].shape[0])
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.steps_per_epoch = -(-self.train.num_rows // self.batch_size)
        self.has_validation = self.val is not None

    def epoch(self, epoch: int):
        order = torch.randperm(self.train.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        labels = self.train.labels
        for start in range(0, self.train.num_rows, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield cached_exits(self.model, self.train, rows), None if labels is None else labels[rows]

    @torch.no_grad()
    def validation_loss(self, chosen, loss_kwargs) -> float:
        total = 0.0
        for start in range(0, self.val.num_rows, 1024):
            rows = torch.arange(start, min(start + 1024, self.val.num_rows))
            labels = None if self.val.labels is None else self.val.labels[rows]
            total += chosen(cached_exits(self.model, self.val, rows), labels, **loss_kwargs).item() * len(rows)
        return total / self.val.num_rows


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI
    return tqdm(total=total, desc=description, disable=None if enabled else True, leave=False)
