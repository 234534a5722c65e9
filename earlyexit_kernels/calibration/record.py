"""What calibration replays: every head's logits on the calibration rows, recorded once, and the engine's decisions on them.

:class:`ExitRecord` holds every layer's logits, halting logits, skips and labels, as a patched
model's all-exits forward returns them (:func:`earlyexit_kernels.training.calibrate_model.record_exits`
records it); :func:`replay` makes a policy's decisions on it with
:func:`earlyexit_kernels.methods.exit_rules.exit_step`, in the engine's order and state, so they are
exactly the patched model's; :func:`references` and :func:`accuracy` (micro-F1 for multi-label) score
them. Every other module of :mod:`earlyexit_kernels.calibration` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from earlyexit_kernels.methods.exit_rules import entropy, exit_step, init_state
from earlyexit_kernels.methods.policies import (
    Entropy,
    ExitPolicy,
    MultiLabelConfidence,
    QExit,
    SkipGates,
    layer_value,
)

__all__ = [
    "TARGETS",
    "ExitRecord",
    "Replay",
    "CurvePoint",
    "replay",
    "replays",
    "accuracy",
    "micro_f1",
    "references",
    "resolve_target",
    "check_classification",
    "is_multi_label_record",
]


#: what calibration can measure a candidate against (see :func:`calibrate`)
TARGETS = ("auto", "accuracy", "agreement")


@dataclass
class ExitRecord:
    """Everything a replay needs, for N sequences of a model with L layers and C classes.

    ``all_logits`` [L, N, C] (the model's dtype), ``labels`` [N] or None,
    ``all_halting_logits`` [L, N] float32 (QExit, DACT) or None, ``all_skipped`` [L, N]
    bool (SkipGates) or None, and the ``policy`` they were recorded under (it fixed the
    halting head and the gates).

    ``reference_logits`` [N, C] or None: the full model a risk is measured against where it is not this
    record's own last layer (a threshold served on an int8 base, certified against the float32 full model the
    user validated: ``eek calibrate --dtype int8``); :attr:`full_logits` reads it, or the last layer.
    """

    all_logits: torch.Tensor
    labels: torch.Tensor | None
    all_halting_logits: torch.Tensor | None
    all_skipped: torch.Tensor | None
    policy: ExitPolicy
    reference_logits: torch.Tensor | None = None

    def __post_init__(self):
        if self.reference_logits is not None and self.reference_logits.shape != self.all_logits.shape[1:]:
            raise ValueError(
                f"the reference's logits must be one row per recorded row, [N, C] = {list(self.all_logits.shape[1:])}; "
                f"got {list(self.reference_logits.shape)}"
            )

    @property
    def full_logits(self) -> torch.Tensor:
        """[N, C]: the full model's logits that risks are measured against (the reference's, else the last layer's)."""
        return self.all_logits[-1] if self.reference_logits is None else self.reference_logits

    @property
    def num_layers(self) -> int:
        return self.all_logits.shape[0]

    def against(self, full_logits: torch.Tensor) -> ExitRecord:
        """This record with its risks measured against ``full_logits`` [N, C], another model's full depth on
        the same rows in the same order (:attr:`reference_logits`, in this record's dtype)."""
        return replace(self, reference_logits=full_logits.to(self.all_logits.dtype))

    def subset(self, rows: torch.Tensor) -> ExitRecord:
        """The record of the sequences selected by ``rows`` (indices or a bool mask [N])."""

        def pick(t, dim=1):
            return None if t is None else t.index_select(dim, _as_index(rows))

        return ExitRecord(
            pick(self.all_logits),
            pick(self.labels, 0),
            pick(self.all_halting_logits),
            pick(self.all_skipped),
            self.policy,
            pick(self.reference_logits, 0),
        )


def _as_index(rows: torch.Tensor) -> torch.Tensor:
    return rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows.long()


@dataclass
class Replay:
    """What a policy decides on a record: ``logits`` [N, C] float32, ``exit_layer`` and ``layers_run`` [N]."""

    logits: torch.Tensor
    exit_layer: torch.Tensor
    layers_run: torch.Tensor


@dataclass
class CurvePoint:
    """One candidate: its policy, accuracy (fraction) and mean layers run (and mean exit layer)."""

    policy: ExitPolicy
    accuracy: float
    mean_layers: float
    mean_exit_layer: float


def replay(policy: ExitPolicy, record: ExitRecord) -> Replay:
    """The decisions of ``policy`` on ``record``: what the engine's all-exits forward returns.

    Shapes: ``record.all_logits`` [L, N, C] in, :class:`Replay` out: ``logits`` [N, C] float32,
    ``exit_layer`` and ``layers_run`` [N] (1-based layers)."""
    num_layers, batch, num_labels = record.all_logits.shape
    policy.check_fits(num_layers, num_labels)
    if type(policy) is Entropy:
        return entropy_replay(policy, record)
    return stepwise_replay(policy, record)


def _layer_entropies(record: ExitRecord, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropies [L, N], finite [L, N])`` as :func:`exit_step` computes them layer by layer, kept on the
    record: a calibration replays hundreds of thresholds on the same logits."""
    cache = record.__dict__.setdefault("_entropies", {})
    if normalized not in cache:
        values, finite = [], []
        for logits in record.all_logits:
            z = logits.float()
            h = entropy(z)
            values.append(h / math.log(z.shape[-1]) if normalized else h)
            finite.append(torch.isfinite(z).all(dim=-1))
        cache[normalized] = (torch.stack(values), torch.stack(finite))
    return cache[normalized]


def entropy_replay(policy: Entropy, record: ExitRecord) -> Replay:
    """:func:`stepwise_replay` of a stateless ``Entropy`` policy, all layers at once from the record's
    entropies: the same decisions (the same float32 entropies against the same thresholds)."""
    return _entropy_replays([policy], record, policy.normalized)[0]


#: policies :func:`replays` decides at once (bounds the [policies, L, N] masks of an entropy path)
_REPLAY_CHUNK = 64


def replays(policies, record: ExitRecord):
    """:func:`replay` of each of ``policies``, in order (a generator). A path's plain ``Entropy`` candidates sharing
    one ``normalized``, or its ``MultiLabelConfidence`` candidates, are compared with the record's per-layer values
    together, ``_REPLAY_CHUNK`` at a time: the same decisions as one at a time, in a few calls for hundreds of
    candidates."""
    policies = list(policies)
    num_layers, _, num_labels = record.all_logits.shape
    for start in range(0, len(policies), _REPLAY_CHUNK):
        chunk = policies[start : start + _REPLAY_CHUNK]
        if all(type(policy) is Entropy for policy in chunk) and len({policy.normalized for policy in chunk}) == 1:
            for policy in chunk:
                policy.check_fits(num_layers, num_labels)
            yield from _entropy_replays(chunk, record, chunk[0].normalized)
        elif all(type(policy) is MultiLabelConfidence for policy in chunk):
            for policy in chunk:
                policy.check_fits(num_layers, num_labels)
            yield from _margin_replays(chunk, record)
        else:
            yield from (replay(policy, record) for policy in chunk)


def _entropy_replays(policies: list[Entropy], record: ExitRecord, normalized: bool) -> list[Replay]:
    """:func:`entropy_replay` of each of ``policies`` (plain ``Entropy``, all ``normalized`` as given), decided at
    once: each layer's entropy against each policy's threshold there, [policies, L, N]; the first layer that exits."""
    num_layers = record.all_logits.shape[0]
    values, finite = _layer_entropies(record, normalized)
    thresholds = torch.tensor(
        [[layer_value(policy.threshold, layer) for layer in range(1, num_layers + 1)] for policy in policies],
        dtype=values.dtype,
    ).to(values.device)
    return _first_exits(record, finite[None] & (values[None] < thresholds[:, :, None]))


def _layer_margins(record: ExitRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """``(smallest |z| over the labels [L, N], finite [L, N])`` of a multi-label record, in float32 as
    :func:`exit_step` compares them; kept on the record like :func:`_layer_entropies`."""
    if "_margins" not in record.__dict__:
        z = record.all_logits.float()
        record.__dict__["_margins"] = (z.abs().amin(dim=-1), torch.isfinite(z).all(dim=-1))
    return record.__dict__["_margins"]


def _margin_replays(policies: list[MultiLabelConfidence], record: ExitRecord) -> list[Replay]:
    """:func:`stepwise_replay` of each ``MultiLabelConfidence`` of ``policies``, decided at once: every label's
    ``|z| >= margin`` is the smallest ``|z|`` against the margin (a finite row), [policies, L, N]."""
    num_layers = record.all_logits.shape[0]
    margins, finite = _layer_margins(record)
    thresholds = torch.tensor(
        [[policy.margin(layer) for layer in range(1, num_layers + 1)] for policy in policies], dtype=margins.dtype
    ).to(margins.device)
    return _first_exits(record, finite[None] & (margins[None] >= thresholds[:, :, None]))


def _first_exits(record: ExitRecord, exits: torch.Tensor) -> list[Replay]:
    """One :class:`Replay` per policy from its exits [policies, L, N] (the last layer always exits): each row
    leaves at the first layer that exits, with that layer's logits."""
    batch = record.all_logits.shape[1]
    exits[:, -1] = True
    rows = torch.arange(batch, device=exits.device)
    out = []
    for exit_layer in exits.to(torch.uint8).argmax(1) + 1:
        out.append(Replay(record.all_logits[exit_layer - 1, rows].float(), exit_layer, exit_layer.clone()))
    return out


def stepwise_replay(policy: ExitPolicy, record: ExitRecord) -> Replay:
    """:func:`replay` layer by layer with :func:`~earlyexit_kernels.methods.exit_rules.exit_step`, in the
    engine's order and state: any policy (the reference of :func:`entropy_replay`)."""
    num_layers, batch, num_labels = record.all_logits.shape
    policy.check_fits(num_layers, num_labels)
    if policy.needs_halting_head and record.all_halting_logits is None:
        raise ValueError(f"{type(policy).__name__} needs halting logits: record the model patched with it")
    if isinstance(policy, QExit) != isinstance(record.policy, QExit) and policy.needs_halting_head:
        raise ValueError("QExit and DACT use different halting heads: record the model patched with the same kind")
    if isinstance(policy, SkipGates) and record.all_skipped is None:
        raise ValueError("SkipGates needs the recorded gates: record the model patched with SkipGates")
    if isinstance(policy, SkipGates) and policy.skip_threshold != record.policy.skip_threshold:
        raise ValueError("the skip threshold changes the hidden states: record the model with the same skip_threshold")
    device = record.all_logits.device
    state = init_state(policy, batch, num_labels, 1, num_layers, device)
    out_logits = torch.zeros(batch, num_labels, dtype=torch.float32, device=device)
    out_exit = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    out_runs = torch.zeros(batch, dtype=torch.long, device=device)
    runs = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    gated = isinstance(policy, SkipGates)
    for layer in range(1, num_layers + 1):
        ran = None
        if gated and 2 <= layer <= num_layers - 1:
            ran = ~record.all_skipped[layer - 1]
            runs = runs + ran.long()
        else:
            runs = runs + 1
        halting = None
        if policy.needs_halting_head:
            halting = record.all_halting_logits[layer - 1]
        exits, returned, new_state = exit_step(policy, layer, num_layers, record.all_logits[layer - 1], halting, state)
        if ran is not None:
            exits = exits & ran
            new_state = {
                k: torch.where(ran.view(-1, *([1] * (v.dim() - 1))), v, state[k]) for k, v in new_state.items()
            }
        state = new_state
        exits = exits & ~done
        done = done | exits
        out_logits = torch.where(exits[:, None], returned.float(), out_logits)
        out_exit = torch.where(exits, torch.full_like(out_exit, layer), out_exit)
        out_runs = torch.where(exits, runs, out_runs)
    return Replay(out_logits, out_exit, out_runs)


def is_multi_label_record(record: ExitRecord) -> bool:
    """Multi-label records: labels [N, C] of 0/1 per label, or recorded under MultiLabelConfidence."""
    labelled = record.labels is not None and record.labels.dim() == 2
    return labelled or isinstance(record.policy, MultiLabelConfidence)


def micro_f1(logits: torch.Tensor, references: torch.Tensor) -> float:
    """Micro-F1 of multi-label ``logits`` [N, C] against 0/1 ``references`` [N, C]: a label is
    predicted when ``sigmoid(z) > 0.5`` (``z > 0``); ``2 TP / (2 TP + FP + FN)`` over every
    (row, label), 1.0 when nothing is predicted nor true."""
    predicted, true = logits.float() > 0, references > 0.5
    tp = (predicted & true).sum().item()
    wrong = (predicted ^ true).sum().item()
    return 1.0 if tp + wrong == 0 else 2 * tp / (2 * tp + wrong)


def check_classification(record: ExitRecord, labels: bool = True) -> None:
    """``ValueError`` saying what to do where ``record`` cannot be scored: no ``labels`` [N] where they are needed,
    multi-label labels that are not [N, C], or a regression head (C == 1 in ``all_logits`` [L, N, C])."""
    if labels and record.labels is None:
        raise ValueError(
            "calibration against accuracy needs labels in the batches; without labels calibrate against the "
            "full model's predictions: calibrate(..., target='agreement')"
        )
    if is_multi_label_record(record):
        if record.labels is not None and record.labels.shape[-1] != record.all_logits.shape[-1]:
            raise ValueError(
                f"multi-label labels must be [N, C] with C = {record.all_logits.shape[-1]} (the model's labels), "
                f"got {list(record.labels.shape)}"
            )
        return
    if record.all_logits.shape[-1] < 2:
        raise ValueError(
            "calibration measures accuracy and needs a classification head (num_labels >= 2); the model is a "
            "regression head (num_labels == 1): choose Patience's regression_threshold or QExit's q by hand, "
            "e.g. with calibration.record.replay(policy, training.record_exits.record_exits(model, batches)), which gives each "
            "candidate's predictions and layers run"
        )


def accuracy(logits: torch.Tensor, references: torch.Tensor) -> float:
    """The default metric: the fraction of rows whose argmax of ``logits`` [N, C] equals ``references`` [N];
    for multi-label references [N, C], :func:`micro_f1`."""
    if references.dim() == 2:
        return micro_f1(logits, references)
    return (logits.argmax(-1) == references).double().mean().item()


def resolve_target(record: ExitRecord, target: str) -> str:
    """``target`` checked against :data:`TARGETS`, ``"auto"`` resolved: accuracy where ``record.labels`` [N] are
    recorded, else agreement with the full model."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    if target == "auto":
        return "accuracy" if record.labels is not None else "agreement"
    return target


def references(record: ExitRecord, target: str = "auto") -> torch.Tensor:
    """What candidates are scored against: the labels (``"accuracy"``) or the full model's
    predicted classes [N] (``"agreement"``; under SkipGates with the recorded skips)."""
    target = resolve_target(record, target)
    check_classification(record, labels=target == "accuracy")
    if target == "accuracy":
        return record.labels
    if is_multi_label_record(record):
        return (record.full_logits.float() > 0).float()
    return record.full_logits.float().argmax(-1)
