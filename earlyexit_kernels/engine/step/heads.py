"""The modules that ``eek.patch`` adds to a model: per-layer classifiers, halting head, skip gates.

An exit head of layer ``i < L`` is two steps (see :mod:`earlyexit_kernels.models.base`):
the adapter's ``exit_input`` (a pooling of the layer's tokens, ``"cls"`` or ``"mean"``,
then for the ``"model"`` form the model's own pooler, no trainable head parameter) and
``classifiers[i - 1]`` on that vector. With ``form="model"`` (the default) the classifier
is a Linear initialised from the model's own, e.g. PABEE's
``z_i = W_i . tanh(W_p h_i + b_p) + b_i`` with the model's pooler ``(W_p, b_p)`` shared by
all layers; with ``form="mlp"`` it is an :class:`MLPExitHead` on the pooled token vector; with
``form="cascade"`` a :class:`CascadeExitHead`, the same MLP plus what the head below said
(its logits, through a ``C x C`` map: a learned running ensemble of the heads so far).
Layer ``L`` always uses the model's own pooling and classifier, so a sequence that runs
every layer gets exactly the unpatched model's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from earlyexit_kernels.engine.layers.module_weights import float_bias, float_weight, linear_compute_dtype, linear_device
from earlyexit_kernels.methods.policies import DACT, ExitPolicy, QExit, SkipGates

__all__ = [
    "weights_fingerprint",
    "HEAD_FORMS",
    "HEAD_POOLINGS",
    "ExitHeadConfig",
    "CascadeExitHead",
    "ExitHeads",
    "LambdaHaltingHead",
    "LinearHaltingHead",
    "MLPExitHead",
    "check_head_choice",
]

#: what an internal exit head reads: the [CLS] row or the mean of the valid tokens.
HEAD_POOLINGS = ("cls", "mean")
#: the form of an internal exit head: the model's own head (pooler + Linear), a small MLP, or
#: the MLP reading the logits of the head below too (Zero Time Waste's cascade, on the logits).
HEAD_FORMS = ("model", "mlp", "cascade")
#: the forms built of an MLP (``mlp_hidden`` is their width)
MLP_FORMS = ("mlp", "cascade")

# Untrained halting heads and gates start from a constant output: QExit from the
# PonderNet prior lambda_p = 0.1, DACT from h = 0.9 (pi decays slowly, so the
# accumulated answer is not frozen early) and gates from 0.1 (skip nothing).
_QEXIT_PRIOR = 0.1
_DACT_INITIAL_HALT = 0.9
_GATE_INITIAL = 0.1


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _constant_linear(in_features: int, value: float) -> nn.Linear:
    linear = nn.Linear(in_features, 1)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, _logit(value))
    return linear


class LambdaHaltingHead(nn.Module):
    """PALBERT's Lambda layer: ``[pooled_i ; pooled_{i-1}]`` (or their difference) -> one halting logit.

    ``pooled`` and ``previous`` are [n, H]; the output is [n].
    """

    def __init__(self, hidden_size: int, combine: str, num_blocks: int):
        super().__init__()
        self.combine = combine
        width = 2 * hidden_size if combine == "concat" else hidden_size
        blocks = []
        for _ in range(num_blocks):
            blocks += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        self.blocks = nn.Sequential(*blocks)
        self.out = _constant_linear(width, _QEXIT_PRIOR)

    def forward(self, pooled: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        if self.combine == "concat":
            x = torch.cat([pooled, previous], dim=-1)
        else:
            x = pooled - previous
        return self.out(self.blocks(x)).squeeze(-1)


class LinearHaltingHead(nn.Module):
    """DACT's halting head: one Linear on the pooled [CLS] vector [n, H] -> logit [n]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.out = _constant_linear(hidden_size, _DACT_INITIAL_HALT)

    def forward(self, pooled: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(pooled).squeeze(-1)


@dataclass(frozen=True)
class ExitHeadConfig:
    """How the internal exit heads (layers ``1..L-1``) of a patched model read a layer.

    ``pooling``: ``"cls"`` or ``"mean"`` (masked mean over the valid tokens).
    ``head``: ``"model"`` (the model's own head form), ``"mlp"`` (:class:`MLPExitHead`) or
    ``"cascade"`` (:class:`CascadeExitHead`).
    ``mlp_hidden``: the MLP's width (None with ``head="model"``).
    """

    pooling: str
    head: str
    mlp_hidden: int | None = None


def check_head_choice(pooling: str | None, head: str | None, mlp_hidden: int | None) -> None:
    """Refuse a pooling, head form or MLP width ``eek.patch`` cannot build, saying what to pass."""
    if pooling is not None and pooling not in HEAD_POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, HEAD_POOLINGS))} (or None); got {pooling!r}")
    if head is not None and head not in HEAD_FORMS:
        raise ValueError(f"head must be one of {', '.join(map(repr, HEAD_FORMS))} (or None); got {head!r}")
    if mlp_hidden is not None:
        if isinstance(mlp_hidden, bool) or not isinstance(mlp_hidden, int) or mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be a positive int (the MLP head's width); got {mlp_hidden!r}")
        if head == "model":
            raise ValueError('mlp_hidden is the width of head="mlp" or "cascade"; it has no meaning with head="model"')


class MLPExitHead(nn.Module):
    """A small exit head on a pooled token vector: ``LayerNorm -> Linear(H, m) -> GELU -> Linear(m, C)``.

    [n, H] -> [n, C]. The LayerNorm puts the token vectors of every layer (whose scales differ
    from layer to layer) on one scale; the head starts untrained (PyTorch's default init).
    """

    def __init__(self, hidden_size: int, width: int, num_labels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.dense = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.gelu(self.dense(self.norm(x))))


class CascadeExitHead(MLPExitHead):
    """An :class:`MLPExitHead` that also reads the logits of the head below it:
    ``z_i = MLP_i(x_i) + B_i z_{i-1}``.

    ``x`` [n, H], ``below`` [n, C] (the logits of layer ``i - 1``'s head) -> [n, C]. Layers
    ``2..L-1`` have one; layer 1, with no head below, has an :class:`MLPExitHead`. Since
    ``z_{i-1}`` holds ``B_{i-1} z_{i-2}`` and so on, each head is the MLP of its layer plus a
    learned mix of every head below it (Zero Time Waste's cascade, Wołczyk et al. 2021, on the
    logits). ``B_i`` starts at zero: an untrained
    cascade head is an MLP head, and heads trained as ``"mlp"`` can start one.
    """

    def __init__(self, hidden_size: int, width: int, num_labels: int):
        super().__init__(hidden_size, width, num_labels)
        self.below = nn.Linear(num_labels, num_labels, bias=False)
        nn.init.zeros_(self.below.weight)

    def forward(self, x: torch.Tensor, below: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if below is None:
            return out
        return out + self.below(below.to(out.dtype))


class ExitHeads(nn.Module):
    """Exit heads of a patched model.

    ``classifiers[i]`` is the head of layer ``i + 1`` for ``i < L - 1``. ``halting`` is
    the halting head of QExit (the Lambda layer) or DACT, ``gates[i]`` the skip gate
    read before layer ``i + 1`` (only ``2 <= i + 1 <= L - 1`` are used). Heads are
    added on demand by :meth:`ensure_for`, so swapping policies keeps what was trained.

    ``pooling`` and ``form`` (``head=`` of ``eek.patch``, see :class:`ExitHeadConfig`) say how
    the classifiers read a layer; ``form="model"`` classifiers are Linears initialised from
    ``final_classifier``, ``form="mlp"`` ones :class:`MLPExitHead` of width ``mlp_hidden``
    (default ``hidden_size``), ``form="cascade"`` ones :class:`CascadeExitHead` of that width,
    which also read the logits of the head below (:attr:`reads_below`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        final_classifier: nn.Linear,
        *,
        pooling: str = "cls",
        form: str = "model",
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.pooling = pooling
        self.classifiers = nn.ModuleList()
        self.set_form(form, mlp_hidden, final_classifier)
        self.qexit_halting: LambdaHaltingHead | None = None
        self.qexit_halting_config: tuple[str, int] | None = None
        self.dact_halting: LinearHaltingHead | None = None
        self.gates: nn.ModuleList | None = None

    @property
    def config(self) -> ExitHeadConfig:
        return ExitHeadConfig(self.pooling, self.form, self.mlp_hidden)

    def set_form(self, form: str, mlp_hidden: int | None, final_classifier: nn.Linear) -> None:
        """Build the classifiers of layers ``1..L-1`` in ``form`` (replacing those of another form)."""
        check_head_choice(None, form, mlp_hidden if form in MLP_FORMS else None)
        width = (mlp_hidden or self.hidden_size) if form in MLP_FORMS else None
        where = dict(device=linear_device(final_classifier), dtype=linear_compute_dtype(final_classifier))
        heads = []
        for layer in range(1, self.num_layers):
            if form in MLP_FORMS:
                # layer 1 has no head below: its cascade head is the MLP alone
                kind = CascadeExitHead if form == "cascade" and layer > 1 else MLPExitHead
                head = kind(self.hidden_size, width, final_classifier.out_features).to(**where)
            else:
                head = nn.Linear(final_classifier.in_features, final_classifier.out_features).to(**where)
                with torch.no_grad():
                    head.weight.copy_(float_weight(final_classifier))
                    head.bias.copy_(float_bias(final_classifier))
            heads.append(head)
        self.classifiers = nn.ModuleList(heads)
        self.form, self.mlp_hidden = form, width

    @property
    def reads_below(self) -> bool:
        """Whether each internal head reads the logits of the head below it (``form="cascade"``):
        the engine then runs every layer's head and carries the last logits per row."""
        return self.form == "cascade"

    def ensure_for(self, policy: ExitPolicy, like: torch.Tensor | None = None) -> None:
        """Add the heads ``policy`` needs and that are not there yet.

        New heads take the device and dtype of ``like`` (the model's classifier weight), else
        of the heads already here (a one-layer model has no per-layer classifier to copy them from).
        """
        reference = like if like is not None else next(self.parameters(), None)
        where = dict(device=reference.device, dtype=reference.dtype) if reference is not None else {}
        if isinstance(policy, QExit):
            config = (policy.combine, policy.lambda_layers)
            if self.qexit_halting is None or self.qexit_halting_config != config:
                self.qexit_halting = LambdaHaltingHead(self.hidden_size, *config).to(**where)
                self.qexit_halting_config = config
        elif policy.needs_halting_head and self.dact_halting is None:
            self.dact_halting = LinearHaltingHead(self.hidden_size).to(**where)
        if policy.needs_skip_gates and self.gates is None:
            self.gates = nn.ModuleList(
                [_constant_linear(self.hidden_size, _GATE_INITIAL) for _ in range(self.num_layers)]
            ).to(**where)

    def describe(self) -> dict:
        """Which heads exist, as plain values (saved next to the model by ``save_pretrained``)."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "pooling": self.pooling,
            "form": self.form,
            "mlp_hidden": self.mlp_hidden,
            "qexit_halting": list(self.qexit_halting_config) if self.qexit_halting is not None else None,
            "dact_halting": self.dact_halting is not None,
            "gates": self.gates is not None,
        }

    def add_described(self, description: dict) -> None:
        """Add the heads a :meth:`describe` result lists (their values are loaded afterwards)."""
        if description.get("qexit_halting"):
            combine, blocks = description["qexit_halting"]
            self.ensure_for(QExit(combine=combine, lambda_layers=int(blocks)))
        if description.get("dact_halting"):
            self.ensure_for(DACT())
        if description.get("gates") and self.gates is None:
            self.ensure_for(SkipGates(entropy_threshold=0.0))

    def halting_head(self, policy: ExitPolicy) -> nn.Module | None:
        if isinstance(policy, QExit):
            return self.qexit_halting
        return self.dact_halting if policy.needs_halting_head else None


def weights_fingerprint(heads: ExitHeads, adapter) -> tuple:
    """Where the exit heads' weights (and the model's pooler and classifier) are and their versions:
    the fused backends keep converted copies of these per tensor and version, and a captured graph
    reads the copies it was captured with, so new buffers and graphs are made when one changes
    (an in-place update of the encoder layers' weights is read by the graphs as it is)."""
    tensors = list(heads.parameters())
    for name in ("pooler_linear", "final_classifier"):
        module = getattr(adapter, name, None)
        if isinstance(module, torch.nn.Module):
            tensors += list(module.parameters())
    out = []
    for tensor in tensors:
        try:
            out.append((tensor.data_ptr(), tensor._version))
        except RuntimeError:  # an inference tensor has no version counter
            out.append((tensor.data_ptr(), -1))
    return tuple(out)
