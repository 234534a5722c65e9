"""Training losses of every exit method (``docs/exit_methods.md``).

All of them work on what a patched model returns in training mode (or with
``return_all_exits=True``), for ``L`` layers, ``B`` sequences and ``C`` classes:

- ``all_logits`` [L, B, C]: the head of every layer on every row (``C == 1``: regression);
- ``all_halting`` [L, B]: the halting probabilities (QExit's ``lambda_i``, DACT's ``h_i``),
  already squashed by the sigmoid;
- ``all_gates`` [L, B]: SmartBERT's gate probabilities ``g_i`` (only layers ``2..L-1``
  have a gate; the rows of layers 1 and L are ignored);
- ``labels`` [B]: class indices (int64), or targets (float) for a regression head; for a
  multi-label head [B, C] of 0/1 per label (float), with a binary cross-entropy per label.

Every loss returns a scalar float32 tensor. ``CE_i`` below is the cross-entropy of
``z_i`` against the label averaged over the batch (the mean squared error for a
regression head), see :func:`per_layer_loss`.

    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    loss = pabee_loss(out.all_logits, labels)

:data:`OBJECTIVES` maps a method name to its loss and to what it needs; it is what
:func:`earlyexit_kernels.training.train.train_exit_heads` and the Hugging Face integration
(``eek.set_training_objective``) use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "is_multi_label_target",
    "per_sample_loss",
    "per_layer_loss",
    "pabee_loss",
    "deebert_stage1_loss",
    "deebert_stage2_loss",
    "fastbert_loss",
    "distillation_per_layer",
    "joint_loss",
    "geometric_prior",
    "halting_distribution",
    "pondernet_loss",
    "ensemble_loss",
    "dact_accumulate",
    "dact_loss",
    "smartbert_stage1_loss",
    "smartbert_stage2_loss",
    "Objective",
    "OBJECTIVES",
    "objective",
]

_EPS = 1e-12


def is_multi_label_target(labels: torch.Tensor | None, num_labels: int) -> bool:
    """Whether ``labels`` are multi-label targets: [B, C] with C == ``num_labels`` >= 2, one 0/1 per label.

    (A one-output head's targets, [B] or [B, 1], stay regression targets.)
    """
    return labels is not None and num_labels > 1 and labels.dim() == 2 and labels.shape[-1] == num_labels


def per_sample_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CE_{i,b}`` (squared error for a regression head, C == 1): [L, B, C], [B] -> [L, B] float32.

    Multi-label targets ``labels`` [B, C] (0/1 per label, see :func:`is_multi_label_target`):
    the binary cross-entropy of each label's sigmoid, averaged over the labels (as Hugging
    Face's ``BCEWithLogitsLoss`` for ``problem_type="multi_label_classification"``).
    """
    num_layers, batch, num_labels = all_logits.shape
    logits = all_logits.float()
    if is_multi_label_target(labels, num_labels):
        target = labels.float()[None].expand_as(logits)
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    if num_labels == 1:
        target = labels.float().view(1, batch).expand(num_layers, batch)
        return (logits.squeeze(-1) - target) ** 2
    flat = nn.functional.cross_entropy(
        logits.reshape(-1, num_labels),
        labels.long().view(1, batch).expand(num_layers, batch).reshape(-1),
        reduction="none",
    )
    return flat.view(num_layers, batch)


def per_layer_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CE_i`` (MSE for a regression head, C == 1) of every layer's head: [L, B, C] -> [L]."""
    return per_sample_loss(all_logits, labels).mean(dim=1)


def pabee_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PABEE: ``sum_i i * CE_i / sum_i i`` over all L heads (deeper heads weigh more)."""
    losses = per_layer_loss(all_logits, labels)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
    return (weights * losses).sum() / weights.sum()


def deebert_stage1_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeeBERT stage 1: ``CE_L``, the model's own classifier (fine-tunes backbone and final classifier)."""
    return per_layer_loss(all_logits[-1:], labels)[0]


def deebert_stage2_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeeBERT stage 2: ``sum_{i<L} CE_i``, the internal heads only (the final classifier is frozen)."""
    return per_layer_loss(all_logits[:-1], labels).sum()


def distillation_per_layer(all_logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """``mean_b KL(p_L || p_i)`` of every internal head against the detached final one: [L, B, C] -> [L-1].

    Regression head (C == 1): ``mean_b (z_i - z_L)^2``; multi-label: the KL of each label's
    Bernoulli ``sigmoid(z_c)``, averaged over the labels.
    """
    logits = all_logits.float()
    teacher, students = logits[-1].detach(), logits[:-1]
    if multi_label:
        log_t, log_not_t = nn.functional.logsigmoid(teacher), nn.functional.logsigmoid(-teacher)
        log_s, log_not_s = nn.functional.logsigmoid(students), nn.functional.logsigmoid(-students)
        kl = log_t.exp() * (log_t - log_s) + log_not_t.exp() * (log_not_t - log_not_s)  # [L-1, B, C]
        return kl.mean(-1).mean(dim=1)
    if logits.shape[-1] == 1:
        return ((students - teacher) ** 2).squeeze(-1).mean(dim=1)
    log_p_teacher = torch.log_softmax(teacher, dim=-1)
    log_p_students = torch.log_softmax(students, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_students)).sum(-1).mean(dim=1)


def fastbert_loss(
    all_logits: torch.Tensor, labels: torch.Tensor | None = None, *, multi_label: bool | None = None
) -> torch.Tensor:
    """FastBERT self-distillation: ``sum_{i<L} mean_b KL(p_L || p_i)``; needs no labels.

    The teacher ``p_L`` (the final classifier) is detached: only the internal heads
    ``1..L-1`` learn from it. ``labels`` is not used except to tell multi-label targets.
    Regression head (C == 1): ``sum_{i<L} mean_b (z_i - z_L)^2`` with the teacher detached
    (our extension). Multi-label heads (``multi_label=True``, or ``labels`` [B, C] floats):
    the KL between the teacher's and the student's Bernoulli ``sigmoid(z_c)`` of every
    label, averaged over the labels, ``sum_{i<L} mean_b mean_c KL(q_{L,c} || q_{i,c})``.
    """
    if multi_label is None:
        multi_label = is_multi_label_target(labels, all_logits.shape[-1])
    return distillation_per_layer(all_logits, multi_label).sum()


def joint_loss(
    all_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    distill: float = 0.5,
    layer_weights: torch.Tensor | list[float] | None = None,
) -> torch.Tensor:
    """Joint training of backbone and heads: ``sum_i w_i l_i / sum_i w_i``.

    ``l_L = CE_L`` (the final classifier learns the labels alone) and, for the internal heads,
    ``l_i = (1 - distill) CE_i + distill mean_b KL(p_L || p_i)`` with the final head as a detached
    teacher (:func:`distillation_per_layer`): the heads learn what the final layer will answer,
    which is what an early exit must match. ``layer_weights`` [L]: by default 1 for every
    internal head and ``L - 1`` for the final one, so the final layer keeps half the weight and
    its accuracy is not traded for the shallow heads'.
    """
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill must lie in [0, 1] (the share of the teacher in each internal loss); got {distill}")
    num_layers = all_logits.shape[0]
    if layer_weights is None:
        weights = torch.ones(num_layers, device=all_logits.device)
        weights[-1] = max(num_layers - 1, 1)
    else:
        weights = torch.as_tensor(layer_weights, dtype=torch.float32, device=all_logits.device)
        if weights.shape != (num_layers,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(
                f"layer_weights must hold {num_layers} non-negative weights (one per layer) with a positive sum; "
                f"got {layer_weights!r}"
            )
    ce = per_layer_loss(all_logits, labels)  # [L]
    if num_layers > 1 and distill > 0:
        multi_label = is_multi_label_target(labels, all_logits.shape[-1])
        internal = (1 - distill) * ce[:-1] + distill * distillation_per_layer(all_logits, multi_label)
        ce = torch.cat([internal, ce[-1:]])
    return (weights * ce).sum() / weights.sum()


def geometric_prior(num_layers: int, lambda_p: float = 0.1, device=None) -> torch.Tensor:
    """PonderNet's prior ``p_G(k) = lambda_p (1 - lambda_p)^(k-1)`` for ``k < L``; layer L gets the remainder.

    Returns [L] float32 summing to 1.
    """
    if not 0.0 < lambda_p < 1.0:
        raise ValueError(f"lambda_p must lie strictly between 0 and 1, got {lambda_p!r}")
    k = torch.arange(1, num_layers, dtype=torch.float64)
    head = lambda_p * (1.0 - lambda_p) ** (k - 1)
    prior = torch.cat([head, (1.0 - lambda_p) ** torch.tensor([num_layers - 1.0], dtype=torch.float64)])
    return prior.to(torch.float32).to(device)


def halting_distribution(all_halting: torch.Tensor) -> torch.Tensor:
    """The halting distribution ``P`` [L, B] from the halting probabilities ``lambda`` [L, B].

    ``P_i = lambda_i * prod_{j<i} (1 - lambda_j)`` for ``i < L`` and, as at inference where
    every sequence leaves at layer L, ``P_L = prod_{j<L} (1 - lambda_j)`` (the remainder,
    so each column sums to 1; ``lambda_L`` is not used).
    """
    lam = all_halting.float()
    survive = torch.cumprod(1.0 - lam, dim=0)  # [L, B]: prod_{j<=i} (1 - lambda_j)
    before = torch.cat([torch.ones_like(lam[:1]), survive[:-1]])  # prod_{j<i}
    return torch.cat([lam[:-1] * before[:-1], before[-1:]])


def pondernet_loss(
    all_logits: torch.Tensor,
    all_halting: torch.Tensor,
    labels: torch.Tensor,
    *,
    lambda_p: float = 0.1,
    beta: float = 0.5,
) -> torch.Tensor:
    """PALBERT / PonderNet: ``sum_i mean_b(P_{i,b} * CE_{i,b}) + beta * mean_b KL(p_G || P_b)``.

    ``P`` is :func:`halting_distribution` of ``all_halting`` [L, B], ``p_G`` is
    :func:`geometric_prior`. The KL is taken in the direction the spec writes,
    ``sum_k p_G(k) ln(p_G(k) / P_k)``; ``P`` is clamped at 1e-12 inside the log.
    Regression heads (C == 1) use the squared error as ``CE``.
    """
    num_layers = all_logits.shape[0]
    if all_halting is None or tuple(all_halting.shape) != tuple(all_logits.shape[:2]):
        raise ValueError(
            "pondernet_loss needs all_halting [L, B] (patch the model with eek.QExit() so it has a halting head)"
        )
    ce = per_sample_loss(all_logits, labels)  # [L, B]
    halt = halting_distribution(all_halting)  # [L, B]
    task = (halt * ce).mean(dim=1).sum()
    prior = geometric_prior(num_layers, lambda_p, device=halt.device)[:, None]
    kl = (prior * (torch.log(prior) - torch.log(halt.clamp_min(_EPS)))).sum(dim=0)
    return task + beta * kl.mean()


def ensemble_loss(all_logits: torch.Tensor, labels: torch.Tensor, *, diversity: float = 0.5) -> torch.Tensor:
    """Ensemble internal classifiers: ``sum_i CE_i + diversity * D``.

    Our form of the diversity term (the paper's full text was not available to us):
    for every head, ``q_i`` is its distribution over the non-target classes
    (``softmax`` of the logits with the target class removed, [B, C-1]); ``D`` is the
    mean over all pairs ``i < j`` of heads of ``mean_b <q_{i,b}, q_{j,b}>``, the
    probability that two heads pick the same wrong class when each picks one. ``D`` is
    1 when every head spreads its error on the same class and falls as they disagree,
    so minimising it rewards disagreement on the non-target classes. With two classes
    there is one non-target class and ``D == 1`` carries no gradient. Classification only.
    """
    num_layers, batch, num_labels = all_logits.shape
    if num_labels < 2:
        raise ValueError("ensemble_loss needs a classification head (num_labels >= 2)")
    accuracy_term = per_layer_loss(all_logits, labels).sum()
    if num_layers < 2:
        return accuracy_term
    logits = all_logits.float()
    target = nn.functional.one_hot(labels.long(), num_labels).bool()[None].expand_as(logits)
    q = torch.softmax(logits.masked_fill(target, -math.inf), dim=-1)  # target class gets 0
    gram = torch.einsum("ibc,jbc->ijb", q, q).mean(dim=-1)  # [L, L]
    pairs = torch.triu(torch.ones(num_layers, num_layers, dtype=torch.bool, device=gram.device), diagonal=1)
    return accuracy_term + diversity * gram[pairs].mean()


def dact_accumulate(all_logits: torch.Tensor, all_halting: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DACT's recursion, differentiable: returns ``a`` [L, B, C] and ``pi`` [L, B].

    ``a_0 = 0``, ``pi_0 = 1``; ``a_i = pi_{i-1} * p_i + (1 - pi_{i-1}) * a_{i-1}``,
    ``pi_i = h_i * pi_{i-1}`` with ``p_i = softmax(z_i)`` and ``h_i = all_halting[i-1]``.
    """
    probs = torch.softmax(all_logits.float(), dim=-1)
    h = all_halting.float()
    acc = torch.zeros_like(probs[0])
    pi = torch.ones_like(h[0])
    accs, pis = [], []
    for i in range(probs.shape[0]):
        acc = pi[:, None] * probs[i] + (1.0 - pi[:, None]) * acc
        pi = h[i] * pi
        accs.append(acc)
        pis.append(pi)
    return torch.stack(accs), torch.stack(pis)


def dact_loss(
    all_logits: torch.Tensor, all_halting: torch.Tensor, labels: torch.Tensor, *, tau: float = 0.01
) -> torch.Tensor:
    """DACT: ``mean_b NLL(ln a_{L,b}) + tau * mean_b sum_i pi_{i,b}`` (the ponder cost).

    ``a`` and ``pi`` from :func:`dact_accumulate`; ``ln a_L`` is clamped at 1e-12.
    ``tau = 0.01`` by default (the paper tunes it per task). Classification only.
    """
    if all_logits.shape[-1] < 2:
        raise ValueError("dact_loss accumulates a class distribution and needs num_labels >= 2")
    if all_halting is None or tuple(all_halting.shape) != tuple(all_logits.shape[:2]):
        raise ValueError("dact_loss needs all_halting [L, B] (patch the model with eek.DACT() for its halting head)")
    acc, pi = dact_accumulate(all_logits, all_halting)
    nll = nn.functional.nll_loss(torch.log(acc[-1].clamp_min(_EPS)), labels.long())
    return nll + tau * pi.sum(dim=0).mean()


def smartbert_stage1_loss(
    all_logits: torch.Tensor, all_gates: torch.Tensor, labels: torch.Tensor, *, lam: float = 0.04
) -> torch.Tensor:
    """SmartBERT stage 1: ``CE_L + lam / sum_{i=2}^{L-1} mean_b g_i`` (``lam = 0.04``).

    Read literally from the spec: the gate term is ``lam`` divided by the sum over the
    gated layers of the batch-mean soft gate ``g_i = sigmoid(.)`` (not the hard ``g'``),
    so it falls as the gates open and rewards skipping. ``all_gates`` [L, B]: rows of
    layers 1 and L (no gate) are ignored. The forward that produces it mixes each gated
    layer as ``h_i = (1 - g'_i) Layer_i(h_{i-1}) + g'_i h_{i-1}`` with the
    straight-through hard gate ``g' = g + (1[g >= r] - g).detach()`` (a patched model in
    training mode under ``eek.SkipGates`` does this). Regression heads use the MSE as ``CE_L``.
    """
    num_layers = all_logits.shape[0]
    task = deebert_stage1_loss(all_logits, labels)
    if num_layers < 3:
        return task
    if all_gates is None:
        raise ValueError("smartbert_stage1_loss needs all_gates [L, B] (patch the model with eek.SkipGates)")
    gate_sum = all_gates[1 : num_layers - 1].float().mean(dim=1).sum()
    return task + lam / gate_sum.clamp_min(_EPS)


def smartbert_stage2_loss(all_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SmartBERT stage 2: ``sum_{i<L} CE_i`` with the backbone (and gates) frozen."""
    return deebert_stage2_loss(all_logits, labels)


@dataclass(frozen=True)
class Objective:
    """A training method: its loss, what it reads from the output and what it trains by default.

    ``inputs``: the output fields the loss takes after ``all_logits`` (``"halting"``,
    ``"gates"``), then ``labels``. ``trains``: ``"all"`` (backbone and every head),
    ``"heads"`` (the exit heads and halting heads, backbone and gates frozen) or
    ``"backbone"`` (everything but the internal classifiers and halting heads: the
    backbone, the final classifier and the skip gates). ``policy``: the policy type the
    model must be patched with (for the halting head or the gates), or None.
    """

    name: str
    loss: object
    inputs: tuple[str, ...] = ()
    trains: str = "all"
    policy: str | None = None
    needs_labels: bool = True
    regression: bool = True
    defaults: dict = field(default_factory=dict)

    def check_labels(self, labels: torch.Tensor | None, num_labels: int) -> None:
        """``ValueError`` when this loss has no form for multi-label targets ``labels`` [B, C]."""
        if not self.regression and is_multi_label_target(labels, num_labels):
            multi = ", ".join(o.name for o in OBJECTIVES.values() if o.regression)
            raise ValueError(
                f"the {self.name} loss reads a softmax over the classes and has no multi-label form (labels "
                f"[B, C] of 0/1 per label); the methods with a per-label sigmoid form are {multi}"
            )

    def check_head(self, num_labels: int) -> None:
        """``ValueError`` when this loss has no form for a regression head (``num_labels == 1``)."""
        if not self.regression and num_labels == 1:
            regression = ", ".join(o.name for o in OBJECTIVES.values() if o.regression)
            raise ValueError(
                f"the {self.name} loss needs a classification head (num_labels >= 2) but the model is a "
                f"regression head (num_labels == 1); the methods with a squared-error form are {regression}"
            )

    def __call__(self, output, labels, **kwargs) -> torch.Tensor:
        """The loss of a training forward's ``output`` (``EarlyExitOutput`` or the engine's ``ExitResult``)."""
        args = [output.all_logits]
        for name in self.inputs:
            value = getattr(output, f"all_{name}")
            if value is None:
                raise ValueError(
                    f"the {self.name} loss needs all_{name} from the forward: patch the model with "
                    f"eek.{self.policy}(...) and call it in training mode (or with return_all_exits=True)"
                )
            args.append(value)
        if self.needs_labels and labels is None:
            raise ValueError(f"the {self.name} loss needs labels")
        self.check_head(output.all_logits.shape[-1])
        self.check_labels(labels, output.all_logits.shape[-1])
        return self.loss(*args, labels, **{**self.defaults, **kwargs})


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("pabee", pabee_loss),
        Objective("deebert_stage1", deebert_stage1_loss, trains="backbone"),
        Objective("deebert_stage2", deebert_stage2_loss, trains="heads"),
        Objective("fastbert", fastbert_loss, trains="heads", needs_labels=False),
        Objective("palbert", pondernet_loss, inputs=("halting",), policy="QExit"),
        Objective("ensemble", ensemble_loss, regression=False),
        Objective("dact", dact_loss, inputs=("halting",), policy="DACT", regression=False),
        # SkipGates exits by entropy, a classification rule: SmartBERT's stage 1 has no regression form
        Objective(
            "smartbert_stage1",
            smartbert_stage1_loss,
            inputs=("gates",),
            trains="backbone",
            policy="SkipGates",
            regression=False,
        ),
        Objective("smartbert_stage2", smartbert_stage2_loss, trains="heads"),
        Objective("joint", joint_loss),
    )
}
#: other names accepted for a method
ALIASES = {"deebert": "deebert_stage2", "pondernet": "palbert"}


def objective(name: str) -> Objective:
    """The :class:`Objective` called ``name`` (see :data:`OBJECTIVES`, :data:`ALIASES`)."""
    key = ALIASES.get(name, name)
    if key not in OBJECTIVES:
        names = ", ".join(list(OBJECTIVES) + list(ALIASES))
        raise ValueError(f"method must be one of {names}; got {name!r}")
    return OBJECTIVES[key]
