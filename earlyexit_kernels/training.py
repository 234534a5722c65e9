"""Training the exit heads: PABEE's weighted loss and DeeBERT's second stage.

Both work on ``all_logits`` [L, B, C], which a patched model returns in training
mode (or with ``return_all_exits=True``):

    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    loss = pabee_loss(out.all_logits, labels)

``train_exit_heads`` is a small self-contained loop around them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .hf_patch import is_patched

__all__ = ["per_layer_loss", "pabee_loss", "deebert_stage2_loss", "freeze_backbone", "train_exit_heads", "METHODS"]

METHODS = ("pabee", "deebert")


def per_layer_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CE_i`` (MSE for a regression head, C == 1) of every layer's head: [L, B, C] -> [L]."""
    num_layers, batch, num_labels = all_logits.shape
    logits = all_logits.float()
    if num_labels == 1:
        target = labels.float().view(1, batch).expand(num_layers, batch)
        return ((logits.squeeze(-1) - target) ** 2).mean(dim=1)
    flat = nn.functional.cross_entropy(
        logits.reshape(-1, num_labels), labels.view(1, batch).expand(num_layers, batch).reshape(-1), reduction="none"
    )
    return flat.view(num_layers, batch).mean(dim=1)


def pabee_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PABEE: ``sum_i i * CE_i / sum_i i`` over all L heads (deeper heads weigh more)."""
    losses = per_layer_loss(all_logits, labels)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
    return (weights * losses).sum() / weights.sum()


def deebert_stage2_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeeBERT stage 2: ``sum_{i<L} CE_i``, the internal heads only (the final classifier is frozen)."""
    return per_layer_loss(all_logits[:-1], labels).sum()


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


def _batches(data) -> Iterable[Mapping[str, torch.Tensor]]:
    if isinstance(data, Mapping):
        yield data
    else:
        yield from data


def train_exit_heads(
    model: nn.Module,
    batches,
    *,
    method: str = "pabee",
    epochs: int = 1,
    lr: float = 2e-5,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    progress: bool = True,
) -> list[float]:
    """Train a patched model's exit heads; returns the loss of every step.

    ``batches``: a re-iterable of dicts with ``input_ids``, ``labels`` and optionally
    ``attention_mask`` and ``token_type_ids`` (a ``DataLoader`` works). ``method``:
    ``"pabee"`` trains the backbone and every head jointly on PABEE's weighted loss;
    ``"deebert"`` is DeeBERT's stage 2, with the fine-tuned backbone and final
    classifier frozen during the loop (their ``requires_grad`` is restored after).
    AdamW with linear warm-up and decay.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not is_patched(model):
        raise ValueError("train_exit_heads needs a model patched with eek.patch")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    if method == "deebert":
        parameters = freeze_backbone(model)
        loss_fn = deebert_stage2_loss
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
        loss_fn = pabee_loss
    steps_per_epoch = sum(1 for _ in _batches(batches))
    total = max(1, steps_per_epoch * epochs)
    warmup = int(total * warmup_fraction)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)

    def schedule(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = _progress(total, f"training exit heads ({method})", progress)
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(epochs):
            for batch in _batches(batches):
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"),
                )
                loss = loss_fn(out.all_logits, batch["labels"])
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the {method} loss is {loss.item()} at step {len(losses)}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        bar.close()
        model.train(was_training)
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    return losses


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI
    return tqdm(total=total, desc=description, disable=None if enabled else True, leave=False)
