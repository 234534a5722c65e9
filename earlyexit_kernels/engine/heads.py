"""The modules that ``eek.patch`` adds to a model: per-layer classifiers, halting head, skip gates.

Default head (PABEE's): ``z_i = W_i . tanh(W_p h_i + b_p) + b_i`` with the model's own
pooler ``(W_p, b_p)`` shared by all layers. The classifiers of layers ``1..L-1`` live
here; layer ``L`` uses the model's own classifier, so a sequence that runs every
layer gets exactly the unpatched model's logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from earlyexit_kernels.methods.policies import DACT, ExitPolicy, QExit, SkipGates

__all__ = ["ExitHeads", "LambdaHaltingHead", "LinearHaltingHead"]

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


class ExitHeads(nn.Module):
    """Exit heads of a patched model.

    ``classifiers[i]`` is the head of layer ``i + 1`` for ``i < L - 1``. ``halting`` is
    the halting head of QExit (the Lambda layer) or DACT, ``gates[i]`` the skip gate
    read before layer ``i + 1`` (only ``2 <= i + 1 <= L - 1`` are used). Heads are
    added on demand by :meth:`ensure_for`, so swapping policies keeps what was trained.
    """

    def __init__(self, hidden_size: int, num_layers: int, final_classifier: nn.Linear):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.classifiers = nn.ModuleList()
        for _ in range(num_layers - 1):
            head = nn.Linear(final_classifier.in_features, final_classifier.out_features)
            head.to(device=final_classifier.weight.device, dtype=final_classifier.weight.dtype)
            with torch.no_grad():
                head.weight.copy_(final_classifier.weight)
                head.bias.copy_(final_classifier.bias)
            self.classifiers.append(head)
        self.qexit_halting: LambdaHaltingHead | None = None
        self.qexit_halting_config: tuple[str, int] | None = None
        self.dact_halting: LinearHaltingHead | None = None
        self.gates: nn.ModuleList | None = None

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
