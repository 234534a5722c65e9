"""The Entropy variant of an exit pattern: a real ``Entropy`` policy whose exit heads make the rows leave on the pattern.

``Scheduled`` knows before a layer who leaves there: where nobody is scheduled it runs no exit head,
no decision and no read-back. A threshold policy (``Entropy``, ``MaxProb``, ``Patience``) cannot: it
runs the head of every layer on every row still running and decides from what the head says. To
time that on the suite's patterns (random weights, on which no row would leave on its own), the
internal heads of layers ``1..L-1`` of the patched model are set so that ``Entropy(THRESHOLD)``,
run as any user's Entropy policy is, makes each row leave exactly after its pattern's layer:

- the batch runs through the model's layers (the adapter's, as the engine runs them), and at each
  layer ``l`` the input of the head's last Linear is taken for the rows still running
  (``exit_layer >= l``): for the ``"model"`` form the model's own pooler on the pooled token
  vector, for the ``"mlp"`` form the MLP's hidden layer;
- that Linear is solved (least squares, minimum norm, float64) so that its first logit is
  ``MARGIN`` for the rows whose exit layer is ``l`` and 0 for the others, every other logit 0:
  a row that leaves at ``l`` sees a confident head (entropy about ``MARGIN * e^-MARGIN``), the
  others a uniform one (entropy ``ln C``, above ``THRESHOLD`` for every ``C >= 2``);
- a layer where nobody leaves gets a zero head: every row sees ``ln C`` and stays.

The fitted heads are then checked as the model computes them (its dtype): each leaving row's
entropy below ``THRESHOLD / 3``, each staying row's above ``1.5 * THRESHOLD``, so that the
decision does not hinge on rounding (a compacted or bucketed batch computes a row's head with
other shapes). A Linear on ``H`` features places at most ``H + 1`` rows this way: a batch with
more rows running at a layer than that, or a fit that misses the margins, raises
:class:`PatternNotReproducible` saying why, and the suite records the rows as skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from earlyexit_kernels.bench.patterns import ExitPattern
from earlyexit_kernels.engine.step.heads import MLPExitHead
from earlyexit_kernels.methods.policies import Entropy

__all__ = ["THRESHOLD", "MARGIN", "PatternNotReproducible", "entropy_variant"]

#: the Entropy policy's threshold (nats; a uniform 2-class head has ln 2 = 0.69)
THRESHOLD = 0.3
#: the first logit of a row that leaves (the others 0)
MARGIN = 12.0


class PatternNotReproducible(ValueError):
    """The exit heads cannot be set so that the Entropy policy follows the pattern; the message says why."""


def _last_linear(head: nn.Module) -> tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """The Linear that makes ``head``'s logits and the function giving its input from the head's input."""
    if isinstance(head, nn.Linear):
        return head, lambda x: x
    if isinstance(head, MLPExitHead):
        return head.out, lambda x: nn.functional.gelu(head.dense(head.norm(x)))
    raise PatternNotReproducible(
        f"an exit head of type {type(head).__name__} has no last Linear the suite knows how to set"
    )


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _solve(features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Minimum-norm ``(w, b)`` with ``features @ w + b = targets`` (float64)."""
    x = features.double()
    center = x.mean(dim=0)
    xc = x - center
    t = targets.double()
    shift = t.mean()
    w = torch.linalg.pinv(xc, rtol=1e-10) @ (t - shift)
    return w, float(shift - center @ w)


def _run(adapter, ids: torch.Tensor, mask: torch.Tensor, visit: Callable) -> None:
    """Run the batch through the layers as the engine does; ``visit(layer, head_input)`` at each internal layer."""
    padded = bool((mask == 0).any())
    hidden = adapter.embed(ids, None, None, None, mask)
    layer_mask = adapter.layer_mask(mask, hidden.dtype) if padded else None
    head_mask = mask if padded else None
    for layer in range(1, adapter.num_layers):
        hidden = adapter.run_layer(layer - 1, hidden, layer_mask)
        visit(layer, adapter.exit_input(layer, hidden, head_mask))


def entropy_variant(adapter, pattern: ExitPattern, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Entropy, Callable]:
    """``(Entropy(THRESHOLD), restore)``: the heads of ``adapter`` (a patched model's) set so that the policy
    exits on ``pattern`` for the batch ``ids``/``mask``; ``restore()`` puts the heads' weights back.

    Raises :class:`PatternNotReproducible` (the heads left as they were) where the heads cannot do it.
    """
    heads = adapter.heads
    exits = pattern.exit_layers.cpu()
    linears = [_last_linear(heads.classifiers[layer - 1]) for layer in range(1, adapter.num_layers)]
    saved = [(linear.weight.detach().clone(), linear.bias.detach().clone()) for linear, _ in linears]

    def restore() -> None:
        with torch.no_grad():
            for (linear, _), (weight, bias) in zip(linears, saved):
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)

    def fit(layer: int, x: torch.Tensor) -> None:
        linear, features_of = linears[layer - 1]
        rows = exits >= layer  # the rows still running
        leaving = exits[rows] == layer
        weight = torch.zeros_like(linear.weight, dtype=torch.float64)
        bias = torch.zeros_like(linear.bias, dtype=torch.float64)
        if bool(leaving.any()):
            features = features_of(x)[rows.to(x.device)].cpu()
            if features.shape[0] > features.shape[1] + 1:
                raise PatternNotReproducible(
                    f"{features.shape[0]} rows run layer {layer}, more than a Linear on {features.shape[1]} features "
                    f"can place (at most {features.shape[1] + 1}): use a smaller batch or a wider model"
                )
            w, b = _solve(features, leaving.double() * MARGIN)
            weight[0], bias[0] = w, b
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        # the check, on the head as the model computes it
        entropy = _entropy(adapter.classify(layer, x[rows.to(x.device)])).cpu()
        late = entropy[leaving] >= THRESHOLD / 3
        early = entropy[~leaving] <= 1.5 * THRESHOLD
        if bool(late.any()) or bool(early.any()):
            raise PatternNotReproducible(
                f"layer {layer}: the fitted head puts {int(late.sum())} leaving rows and {int(early.sum())} staying "
                f"rows near the threshold {THRESHOLD} in {linear.weight.dtype}"
            )

    try:
        _run(adapter, ids, mask, fit)
    except PatternNotReproducible:
        restore()
        raise
    return Entropy(THRESHOLD), restore
