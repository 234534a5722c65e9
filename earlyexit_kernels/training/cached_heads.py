"""The fast path of head-only training: run the frozen backbone once, train the heads on what it produced.

When only the exit heads learn (``trains="heads"``: the internal classifiers and the halting
heads), the input each head reads does not depend on anything that learns. One pass of the
frozen model over the data (``torch.no_grad()``, eval mode, every layer on every row) records
what every head reads, and every later epoch runs the heads alone on those vectors:

    cache = cache_exit_inputs(model, batches)          # one forward per batch
    out = cached_exits(model, cache, rows)              # [L, n, C] logits of the heads, no backbone
    loss = objective("deebert_stage2")(out, cache.labels[rows])

:func:`earlyexit_kernels.training.train.train_exit_heads` takes this path by itself where it is
valid (see :func:`cache_reason`). What it records is what the engine hands the heads: the
argument of ``adapter.classify(layer, x)`` for every layer (the pooled [CLS] vector, the masked
mean or whatever the model's exit heads read), the input of the halting head (QExit, DACT) and
the final classifier's logits in eval mode (the teacher of self-distillation). The forward
that records them is the model's own all-exits forward on the ``"torch"`` backend, so
SkipGates' recorded skips apply as they do in training.

One difference from training through the forward: the backbone runs in eval mode, so its
dropout does not perturb the vectors (the heads' own dropout, inside ``classify``, still
applies); with dropout off the two paths give the same gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from earlyexit_kernels.methods.losses import Objective
from earlyexit_kernels.methods.policies import QExit
from earlyexit_kernels.models.base import masked_mean
from earlyexit_kernels.patching.state import is_patched, state_of, using_backend
from earlyexit_kernels.training.calibrate_model import each_batch

__all__ = ["ExitInputCache", "CachedExits", "cache_exit_inputs", "cached_exits", "cached_record", "cache_reason"]


@dataclass
class ExitInputCache:
    """What the heads read, for N rows of a model with L layers and C classes (kept on the CPU).

    ``inputs`` [N, L, D]: the input of ``adapter.classify(layer, .)`` at every layer ``1..L``
    (layer L's is the final classifier's). ``halting_inputs`` [N, L, D']: the input of the
    halting head at every layer (QExit, DACT), or None (no halting head). ``final_logits``
    [N, C]: the final classifier on every row in eval mode. ``labels`` [N] or None (no
    batch had labels). ``pooled`` (``cache_exit_inputs(..., both_poolings=True)``): the [CLS] and
    the masked-mean token vectors of layers ``1..L-1`` ({"cls": [N, L-1, H], "mean": ...}), from
    which :func:`earlyexit_kernels.training.head_choice.inputs_for` makes the inputs of any head
    configuration without another pass of the model.
    """

    inputs: torch.Tensor
    halting_inputs: torch.Tensor | None
    final_logits: torch.Tensor
    labels: torch.Tensor | None
    pooled: dict[str, torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_layers(self) -> int:
        return self.inputs.shape[1]

    def nbytes(self) -> int:
        """The memory the cache holds, in bytes."""
        tensors = (self.inputs, self.halting_inputs, self.final_logits, self.labels)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class CachedExits:
    """What a training forward returns, as far as the losses read it: ``all_logits`` [L, n, C],
    ``all_halting`` [L, n] (sigmoid of the halting logits) or None, ``all_gates`` None,
    ``all_halting_logits`` [L, n] float32 or None."""

    all_logits: torch.Tensor
    all_halting: torch.Tensor | None = None
    all_gates: torch.Tensor | None = None
    all_halting_logits: torch.Tensor | None = None


def cache_reason(model, chosen: Objective, trainable: Iterable[torch.nn.Parameter]) -> str | None:
    """Why the cached path cannot train ``trainable`` with ``chosen`` on ``model`` (None: it can).

    It can when every trainable parameter belongs to an internal classifier or a halting
    head (nothing that computes the heads' inputs learns) and the loss reads no gates.
    """
    heads = model.early_exit_heads
    own = list(heads.classifiers.parameters())
    for module in (heads.qexit_halting, heads.dact_halting):
        if module is not None:
            own += list(module.parameters())
    own_ids = {id(p) for p in own}
    outside = [p for p in trainable if id(p) not in own_ids]
    if outside:
        count = sum(p.numel() for p in outside)
        return f"{count} trainable parameters outside the exit heads (backbone, final classifier or gates)"
    if "gates" in chosen.inputs:
        return f"the {chosen.name} loss reads the skip gates"
    return None


@torch.no_grad()
def cache_exit_inputs(
    model, batches, *, progress: bool = False, description: str = "caching", both_poolings: bool = False
) -> ExitInputCache:
    """Run the frozen patched ``model`` once over ``batches`` and record what every head reads.

    ``batches``: dicts with ``input_ids`` and optionally ``attention_mask``,
    ``token_type_ids``, ``labels`` (all batches with labels or none). The model runs in
    eval mode on the ``"torch"`` backend with every layer on every row; its mode and
    backend are restored after. Memory: ``N * L * D`` values of the model's dtype (for
    12k rows of a 6-layer, 384-wide model, 110 MB in float32); ``both_poolings`` also keeps
    the [CLS] and masked-mean vectors of every internal layer (``cache.pooled``: twice that again).
    """
    if not is_patched(model):
        raise ValueError("cache_exit_inputs needs a model patched with eek.patch")
    state = state_of(model)
    adapter = state.adapter
    heads = model.early_exit_heads
    halting_head = heads.halting_head(state.policy)
    device = next(model.parameters()).device
    recorded: list[torch.Tensor] = []
    halting_recorded: list[torch.Tensor] = []
    classify = adapter.classify

    def recording_classify(layer, x, below=None):
        recorded.append(x.detach())
        return classify(layer, x, below)

    def record_halting(module, args):
        halting_recorded.append(args[0].detach())

    pooled_hidden = adapter.pooled_hidden
    pooled_recorded: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
    pooled_batches: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}

    def recording_pooled_hidden(hidden, mask):
        pooled_recorded["cls"].append(adapter.token_vectors(hidden[:, 0]).detach())
        pooled_recorded["mean"].append(masked_mean(adapter.token_vectors(hidden), mask).detach())
        return pooled_hidden(hidden, mask)

    inputs, halting_inputs, finals, labels = [], [], [], []
    with_labels = None
    was_training = model.training
    hook = halting_head.register_forward_pre_hook(record_halting) if halting_head is not None else None
    own_classify = vars(adapter).get("classify")
    adapter.classify = recording_classify  # an instance attribute: the engine's calls go through it
    if both_poolings:
        adapter.pooled_hidden = recording_pooled_hidden
    bar = None
    with using_backend(model, "torch"):  # the fused heads of the fast backends never call classify
        try:
            model.eval()
            batch_list = batches if isinstance(batches, (list, tuple)) else None
            bar = _progress(len(batch_list) if batch_list is not None else None, description, progress)
            for batch in each_batch(batches):
                recorded.clear()
                halting_recorded.clear()
                for kept in pooled_recorded.values():
                    kept.clear()
                ids = batch["input_ids"]
                out = model(
                    input_ids=ids.to(device),
                    attention_mask=None if batch.get("attention_mask") is None else batch["attention_mask"].to(device),
                    token_type_ids=None if batch.get("token_type_ids") is None else batch["token_type_ids"].to(device),
                    return_all_exits=True,
                )
                num_layers = out.all_logits.shape[0]
                if len(recorded) != num_layers or any(x.shape[0] != ids.shape[0] for x in recorded):
                    raise RuntimeError(
                        f"the all-exits forward called the heads {len(recorded)} times on {ids.shape[0]} rows; "
                        f"expected once per layer ({num_layers}) on every row"
                    )
                inputs.append(torch.stack(recorded, dim=1).cpu())
                if both_poolings:
                    if len(pooled_recorded["cls"]) != num_layers - 1:
                        raise RuntimeError(
                            f"the all-exits forward pooled {len(pooled_recorded['cls'])} layers; expected {num_layers - 1}"
                        )
                    for name, kept in pooled_recorded.items():
                        pooled_batches[name].append(torch.stack(kept, dim=1).cpu())
                if halting_head is not None:
                    halting_inputs.append(torch.stack(halting_recorded, dim=1).cpu())
                finals.append(out.all_logits[-1].cpu())
                has_labels = batch.get("labels") is not None
                if with_labels is not None and has_labels != with_labels:
                    raise ValueError("some batches have labels and some do not: give labels in every batch or in none")
                with_labels = has_labels
                if has_labels:
                    labels.append(batch["labels"].cpu())
                bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if own_classify is None:
                del adapter.classify
            else:
                adapter.classify = own_classify
            if both_poolings:
                del adapter.pooled_hidden
            if hook is not None:
                hook.remove()
            model.train(was_training)
    if not inputs:
        raise ValueError("cache_exit_inputs got no batches")
    return ExitInputCache(
        torch.cat(inputs),
        torch.cat(halting_inputs) if halting_inputs else None,
        torch.cat(finals),
        torch.cat(labels) if labels else None,
        {name: torch.cat(kept) for name, kept in pooled_batches.items()} if both_poolings else None,
    )


def cached_exits(model, cache: ExitInputCache, rows: torch.Tensor | None = None) -> CachedExits:
    """The heads of the patched ``model`` on the cached inputs of ``rows`` (default: all): no backbone.

    Layers ``1..L-1`` run ``adapter.classify`` (with the model's dropout when the model is in
    training mode; ``"cascade"`` heads read the logits of the head below, in layer order),
    layer L is the cached final logits, the halting head (when the policy
    has one) runs on its cached inputs as the engine runs it (QExit also reads the previous
    layer's, zeros before layer 1). Differentiable in the heads' parameters.
    """
    state = state_of(model, "cached_exits")
    adapter = state.adapter
    heads = model.early_exit_heads
    device = next(heads.parameters()).device
    pick = slice(None) if rows is None else rows
    inputs = cache.inputs[pick].to(device)
    num_layers = inputs.shape[1]
    final = cache.final_logits[pick].to(device)
    logits, below = [], None
    for layer in range(1, num_layers):
        logits.append(adapter.classify(layer, inputs[:, layer - 1], below))
        if adapter.heads_read_below:  # the next head reads these logits, detached, as the engine hands them on
            below = logits[-1].detach().float()
    all_logits = torch.stack([*(z.to(final.dtype) for z in logits), final])
    halting_head = heads.halting_head(state.policy)
    all_halting = all_halting_logits = None
    if halting_head is not None:
        if cache.halting_inputs is None:
            raise ValueError("the cache holds no halting-head inputs: cache it with the model patched with this policy")
        pooled = cache.halting_inputs[pick].to(device)
        reads_previous = isinstance(state.policy, QExit)
        previous = torch.zeros_like(pooled[:, 0])
        halting = []
        for layer in range(num_layers):
            halting.append(halting_head(pooled[:, layer], previous if reads_previous else None).float())
            previous = pooled[:, layer]
        all_halting_logits = torch.stack(halting)
        all_halting = torch.sigmoid(all_halting_logits)
    return CachedExits(all_logits, all_halting, None, all_halting_logits)


@torch.no_grad()
def cached_record(model, cache: ExitInputCache, chunk: int = 4096):
    """The :class:`earlyexit_kernels.calibration.record.ExitRecord` of ``cache`` without a forward.

    What :func:`earlyexit_kernels.training.calibrate_model.record_exits` records on the batches the
    cache was made from (the heads in eval mode), for calibrating right after training on
    cached inputs. Not for ``SkipGates`` (the cache has no skips): record that one with a forward.
    """
    from earlyexit_kernels.calibration.record import ExitRecord
    from earlyexit_kernels.methods.policies import SkipGates

    policy = state_of(model, "cached_record").policy
    if isinstance(policy, SkipGates):
        raise ValueError(
            "a SkipGates record needs the gates' skips: use training.record_exits.record_exits(model, batches)"
        )
    was_training = model.training
    model.eval()
    logits, halting = [], []
    try:
        for start in range(0, cache.num_rows, chunk):
            out = cached_exits(model, cache, torch.arange(start, min(start + chunk, cache.num_rows)))
            logits.append(out.all_logits.cpu())
            if out.all_halting_logits is not None:
                halting.append(out.all_halting_logits.cpu())
    finally:
        model.train(was_training)
    return ExitRecord(
        torch.cat(logits, dim=1), cache.labels, torch.cat(halting, dim=1) if halting else None, None, policy
    )


def _progress(total, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=None if enabled else True, leave=False)
