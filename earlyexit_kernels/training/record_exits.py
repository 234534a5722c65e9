"""Record what calibration replays: a patched model's every head on some rows, run once.

:func:`record_exits` runs the model's all-exits forward (``return_all_exits=True``) over the rows
and keeps an :class:`~earlyexit_kernels.calibration.record.ExitRecord`; everything after it
(replay, candidates, the certificate) is tensor code in :mod:`earlyexit_kernels.calibration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from earlyexit_kernels.calibration.record import ExitRecord
from earlyexit_kernels.methods.policies import Scheduled

__all__ = ["each_batch", "record_exits"]


def each_batch(data) -> Iterable[Mapping[str, torch.Tensor]]:
    """The batches of ``data``: one batch (a dict) alone, or each of a list, a ``DataLoader`` or a generator."""
    if isinstance(data, Mapping):
        yield data
    else:
        yield from data


@torch.no_grad()
def record_exits(model, batches) -> ExitRecord:
    """Run every layer and head of a patched model on ``batches`` once (eval mode) and record them.

    ``batches``: dicts with ``input_ids`` and optionally ``attention_mask``,
    ``token_type_ids``, ``labels``. The record is kept on the CPU.
    """
    from earlyexit_kernels.patching.state import is_patched, state_of

    if not is_patched(model):
        raise ValueError("record_exits needs a model patched with eek.patch")
    policy = state_of(model).policy
    if isinstance(policy, Scheduled):
        raise ValueError("a Scheduled policy cannot be calibrated; patch the model with the policy to calibrate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, halting, skipped, labels = [], [], [], []
    try:
        for batch in each_batch(batches):
            out = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=None if batch.get("attention_mask") is None else batch["attention_mask"].to(device),
                token_type_ids=None if batch.get("token_type_ids") is None else batch["token_type_ids"].to(device),
                return_all_exits=True,
            )
            logits.append(out.all_logits.cpu())
            if out.all_halting_logits is not None:
                halting.append(out.all_halting_logits.cpu())
            if out.all_skipped is not None:
                skipped.append(out.all_skipped.cpu())
            if batch.get("labels") is not None:
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("record_exits got no batches")
    return ExitRecord(
        torch.cat(logits, dim=1),
        torch.cat(labels) if labels else None,
        torch.cat(halting, dim=1) if halting else None,
        torch.cat(skipped, dim=1) if skipped else None,
        policy,
    )
