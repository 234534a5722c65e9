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
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from earlyexit_kernels.integrations.hf_patch import _check_objective_policy, is_patched
from earlyexit_kernels.methods.losses import ALIASES, OBJECTIVES, objective

__all__ = [
    "freeze_backbone",
    "select_trainable",
    "parameter_groups",
    "train_exit_heads",
    "METHODS",
    "HALTING_LR",
    "OPTIMIZERS",
    "SCHEDULES",
]

#: method names accepted by :func:`train_exit_heads` (and their aliases)
METHODS = tuple(OBJECTIVES) + tuple(ALIASES)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("linear", "cosine", "constant")
_TRAINS = ("all", "heads", "backbone")
#: default learning rate of the halting heads (QExit, DACT) and SmartBERT's gates. They
#: start from a constant output (zero weights), far from where they must end: DACT's
#: halting logit starts at 2.2 and must move by 2-4 before any sequence can leave before
#: the last layers, which the backbone's learning rate (1e-5 to 1e-3) does not do in a
#: few hundred steps.
HALTING_LR = 3e-3


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


def _halting_parameters(model) -> list[nn.Parameter]:
    """The halting heads (QExit's Lambda layer, DACT's linear head) and SmartBERT's gates."""
    heads = model.early_exit_heads
    modules = [heads.qexit_halting, heads.dact_halting, heads.gates]
    return [p for module in modules if module is not None for p in module.parameters()]


def parameter_groups(
    model: nn.Module, lr: float, halting_lr: float | None = HALTING_LR, parameters: list[nn.Parameter] | None = None
) -> list[dict]:
    """Optimizer parameter groups: the halting heads and gates at ``halting_lr``, the rest at ``lr``.

    ``parameters``: the trainable ones (default: those of ``model`` that require grad).
    For an optimizer of your own, e.g. a ``Trainer``'s:
    ``Trainer(..., optimizers=(torch.optim.AdamW(parameter_groups(model, lr=2e-5)), None))``.
    """
    if not is_patched(model):
        raise ValueError("parameter_groups needs a model patched with eek.patch")
    if parameters is None:
        parameters = [p for p in model.parameters() if p.requires_grad]
    if halting_lr is None:
        return [{"params": parameters, "lr": lr}]
    halting = {id(p) for p in _halting_parameters(model)}
    rest = [p for p in parameters if id(p) not in halting]
    own = [p for p in parameters if id(p) in halting]
    return [group for group in ({"params": rest, "lr": lr}, {"params": own, "lr": halting_lr}) if group["params"]]


def select_trainable(model: nn.Module, trains: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for one of ``"all"``, ``"heads"``, ``"backbone"``; returns the trainable parameters.

    ``"heads"``: the internal classifiers of layers ``1..L-1`` and the halting heads
    (backbone, final classifier and gates frozen). ``"backbone"``: the backbone, the
    final classifier and the skip gates (internal classifiers and halting heads frozen).
    ``"all"``: everything.
    """
    if not is_patched(model):
        raise ValueError("select_trainable needs a model patched with eek.patch")
    if trains not in _TRAINS:
        raise ValueError(f"trains must be one of {', '.join(_TRAINS)}; got {trains!r}")
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


def train_exit_heads(
    model: nn.Module,
    batches,
    *,
    method: str = "pabee",
    epochs: int = 1,
    lr: float = 2e-5,
    halting_lr: float | None = HALTING_LR,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    optimizer: str = "adamw",
    schedule: str = "linear",
    trains: str | None = None,
    loss_kwargs: Mapping | None = None,
    progress: bool = True,
) -> list[float]:
    """Train a patched model with one method's loss; returns the loss of every step.

    ``batches``: a re-iterable of dicts with ``input_ids``, ``labels`` and optionally
    ``attention_mask`` and ``token_type_ids`` (a list or a ``DataLoader``; ``labels`` may be
    left out for ``"fastbert"``). A one-shot iterator (a generator) is read into memory
    for one epoch; with ``epochs > 1`` it raises ``ValueError``, as does an epoch that
    finds no batches. ``method``: a name of
    :data:`earlyexit_kernels.methods.losses.OBJECTIVES` (``"pabee"``, ``"deebert_stage1"``,
    ``"deebert_stage2"`` (alias ``"deebert"``), ``"fastbert"``, ``"palbert"`` (alias
    ``"pondernet"``), ``"ensemble"``, ``"dact"``, ``"smartbert_stage1"``,
    ``"smartbert_stage2"``). ``"palbert"`` needs the model patched with ``eek.QExit``,
    ``"dact"`` with ``eek.DACT`` and ``"smartbert_stage1"`` with ``eek.SkipGates`` (their
    halting head or gates). ``trains``: which parameters learn, ``"all"`` (joint),
    ``"heads"`` (head-only) or ``"backbone"``; by default the method's own (see
    :func:`select_trainable`); the others are frozen during the loop and their
    ``requires_grad`` is restored after. ``optimizer``: ``"adamw"``, ``"adam"`` or
    ``"sgd"`` (momentum 0.9); ``schedule``: linear warm-up over ``warmup_fraction`` of
    the steps, then ``"linear"`` decay, ``"cosine"`` decay or ``"constant"``.
    ``halting_lr``: the learning rate of the halting heads (QExit, DACT) and SmartBERT's
    gates when they train (:data:`HALTING_LR`, 3e-3, by default; ``None``: ``lr`` like the
    rest). They start from a constant output and must move far (see :data:`HALTING_LR`);
    at the backbone's rate DACT's head barely moves and DACT runs nearly every layer. The
    schedule scales both rates alike.
    ``loss_kwargs`` go to the loss (``beta=``, ``tau=``, ``lam=``, ``diversity=``).
    ``progress``: a tqdm bar on a terminal.
    """
    chosen = objective(method)
    if not is_patched(model):
        raise ValueError("train_exit_heads needs a model patched with eek.patch")
    chosen.check_head(model.config.num_labels)
    _check_objective_policy(chosen, model._eek_policy)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if halting_lr is not None and not (
        isinstance(halting_lr, (int, float)) and math.isfinite(halting_lr) and halting_lr > 0
    ):
        raise ValueError(f"halting_lr must be a positive number or None (the same as lr); got {halting_lr!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if isinstance(batches, Iterator):
        # a generator or an iterator can be read once: one epoch, held in memory so that the
        # schedule knows its length
        if epochs > 1:
            raise ValueError(
                f"batches is a one-shot iterator ({type(batches).__name__}): it can be read only once, so "
                f"epochs={epochs} would train on nothing after the first epoch; pass a list or a DataLoader "
                f"(re-iterable), or epochs=1"
            )
        batches = list(batches)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    loss_kwargs = dict(loss_kwargs or {})
    steps_per_epoch = sum(1 for _ in _batches(batches))
    if steps_per_epoch == 0:
        raise ValueError("train_exit_heads got no batches: batches is empty (or an iterable already read)")
    total = max(1, steps_per_epoch * epochs)
    warmup = int(total * warmup_fraction)
    was_training = model.training
    bar = None
    losses = []
    try:
        parameters = select_trainable(model, trains or chosen.trains)
        opt = _optimizer(optimizer, parameter_groups(model, lr, halting_lr, parameters), weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total, warmup))
        bar = _progress(total, f"training ({chosen.name})", progress)
        model.train()
        for epoch in range(epochs):
            steps_before = len(losses)
            for batch in _batches(batches):
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"),
                )
                loss = chosen(out, batch.get("labels"), **loss_kwargs)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the {chosen.name} loss is {loss.item()} at step {len(losses)}; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                opt.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if len(losses) == steps_before:
                raise ValueError(
                    f"epoch {epoch + 1} of {epochs} found no batches ({steps_per_epoch} when they were counted "
                    f"before the training): batches must give the same batches on every pass; pass a list or a "
                    f"DataLoader"
                )
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    return losses


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI
    return tqdm(total=total, desc=description, disable=None if enabled else True, leave=False)
