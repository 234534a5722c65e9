"""How many training rows ``eek fit`` keeps out to certify on: the verdicts, over recorded logits.

The exit heads need far fewer rows than the bound does: a head reads one layer's vector and
converges on a few thousand rows at most, while certifying a loss under one point at 95% wants
thousands of rows (1% at 95% on 343 rows allows no error at all). A fixed quarter of the file
starves the bound on a large file and can starve the heads on a small one. So the share is
measured: the heads (the method's heads-only stage, on a copy of the model) are trained on
growing prefixes of a random order of the training rows, ``FIRST_PROBE_ROWS`` then twice as
many each time, and each time the layers they would keep certified are *predicted* on the
validation rows: along the policy's global grid, the last candidate (in the certified order)
that the rows left to certify would certify were they like the validation rows (the exact
binomial for 0/1 losses; the observed paired loss plus ``z`` standard errors, ``z`` the normal
quantile of the confidence).

After each doubling the probe weighs both sides of the next one (:func:`doubling_verdict`): what
the last doubling saved, the heads compared at the same calibration rows, against what the next
doubling's fewer calibration rows would cost the current heads. It stops only when that net gain
is below ``MIN_GAIN_LAYERS`` with ``STOP_CONFIDENCE`` over bootstrap re-draws of the validation
rows (the same re-draws weigh both heads: paired). A greedy stop on the point difference stopped
on noise: an outside check's 256 and 512 rows predicted 3.88 and 3.92 layers on 1,031 validation
rows, the probe kept 512 rows to train the heads, and the fit ran 4.10 of 6 layers on unseen rows
where training on three quarters ran 3.56. Heads rarely get worse with more rows, so a flat or
noisy difference goes on; the price of fewer calibration rows, which grows fast once they are few,
is what stops it. The re-draws measure the validation rows' noise, not the training's. The rows
the probe reached train the heads, every later row of the order certifies; the probe reads only
rows that end up training and the validation rows, never a calibration row, so the certificate
stays exact (which is why it never goes back to a smaller size).

Where there is nothing to probe (a recipe that trains the backbone too, too few rows for two
sizes), the fixed ``CALIBRATION_FRACTION`` applies. Past the last size that leaves the bound its
fewest rows, the step to that fixed share (or to the rows probed, where more) is weighed like one more
step, its price at the fixed share's calibration rows. Its gain is the last doubling's scaled by the
step's length in doublings (``log2`` of the rows' ratio: the heads' learning curve taken as straight in
the log of the rows, which overstates what a curve that flattens would give, so the probe stops on clear
evidence only); the probe keeps its last size where the price is shown to outweigh it. On an outside
check's case it goes on (the validation rows predict the fixed share's heads 0.13 layers better at a
price of 0.08) and the fit runs 3.59 of 6 layers on unseen rows; the last size, 4,096 rows, forced,
ran 3.38 (``benchmarks/results/amd_epyc/calibration_share_unlabelled_rt_cpu.md``): one case, which the
validation rows could not tell.

This module holds what is computed on the validation rows' recorded logits: each candidate's predicted
certificate (:class:`CandidateTable`, :func:`predicted_layers`), the bootstrap re-draws and the verdict of a
doubling (:func:`doubling_verdict`). The probe itself, which trains heads on a copy of the model, is
:func:`earlyexit_kernels.training.share_probe.choose_share`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.candidates import certified_candidates
from earlyexit_kernels.calibration.predicted_walk import WalkTable, point_weights
from earlyexit_kernels.calibration.row_losses import row_losses

__all__ = [
    "MIN_GAIN_LAYERS",
    "REDRAWS",
    "STOP_CONFIDENCE",
    "CandidateTable",
    "DoublingVerdict",
    "doubling_verdict",
    "predicted_layers",
    "redraws",
]

#: the mean layers a doubling of the training rows must be predicted to save for the probe to go on
MIN_GAIN_LAYERS = 0.05
#: the probe stops once the net gain of a doubling is below ``MIN_GAIN_LAYERS`` with this confidence
STOP_CONFIDENCE = 0.9
#: bootstrap re-draws of the validation rows that measure that confidence
REDRAWS = 400


def predicted_layers(record, policy, budget: float, confidence: float, calibration_rows: int, target: str) -> float:
    """The mean layers certification on ``calibration_rows`` rows like ``record``'s would keep: along the global
    grid of ``policy``'s family, the last candidate (most conservative first) that rows like ``record``'s would
    certify: 0/1 losses by the exact binomial, paired ones when their mean plus ``z`` standard errors at
    ``calibration_rows`` rows is within ``budget`` (``z``: the normal quantile of ``confidence``); all the
    layers where none is (and below the rows a loss-free policy needs)."""
    table = CandidateTable.of(record, policy, target)
    return float(table.predicted(point_weights(table.rows), budget, confidence, calibration_rows)[0])


class CandidateTable(WalkTable):
    """Each candidate of the certified grid (most conservative first) on the rows of one record: a
    :class:`~earlyexit_kernels.calibration.predicted_walk.WalkTable` of the policy's global grid."""

    @classmethod
    def of(cls, record, policy, target: str) -> CandidateTable:
        num_layers, _, num_labels = record.all_logits.shape
        grid = certified_candidates(policy, num_layers, num_labels)
        table = WalkTable.of_path(grid, record, lambda logits: row_losses(logits, record, target))
        return cls(table.losses, table.layers, table.binary, table.num_layers)


def redraws(rows: int, draws: int, seed: int) -> torch.Tensor:
    """Weights [1 + draws, rows]: the rows as they are, then ``draws`` bootstrap re-draws of them (each row's
    count over ``rows``), seeded: the same re-draws weigh every record of the same rows (paired)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(rows, (draws, rows), generator=generator)
    counts = torch.zeros((draws, rows), dtype=torch.float64).scatter_add_(
        1, picks, torch.ones((draws, rows), dtype=torch.float64)
    )
    return torch.cat([point_weights(rows), counts / rows])


@dataclass
class DoublingVerdict:
    """Whether to double the head-training rows once more, weighed on the validation rows.

    ``gain``: mean layers the last doubling saved, both heads certified on the calibration rows left now;
    ``price``: what the next step's fewer calibration rows cost the current heads; ``bound``: the
    upper ``STOP_CONFIDENCE`` re-draw quantile of ``step * gain - price`` (``step``: the next step's length
    in doublings, 1 for a doubling). The probe goes on unless that bound
    is under ``MIN_GAIN_LAYERS``: a difference the validation rows cannot tell from noise does not stop it."""

    gain: float
    price: float
    bound: float

    @property
    def go_on(self) -> bool:
        return self.bound >= MIN_GAIN_LAYERS

    def describe(self, rows: int, doubled: int, following: int | None = None) -> str:
        step = "the next doubling's" if following is None or following == 2 * doubled else f"{following} rows'"
        return (
            f"doubling {rows} rows to {doubled} saved {self.gain:+.2f} layers, {step} fewer calibration "
            f"rows would cost {self.price:+.2f}: the net gain's upper {100 * STOP_CONFIDENCE:g}% bound over re-draws "
            f"of the validation rows is {self.bound:+.2f}, under {MIN_GAIN_LAYERS:g}"
        )


def doubling_verdict(
    previous: CandidateTable,
    current: CandidateTable,
    weights: torch.Tensor,
    *,
    budget: float,
    confidence: float,
    calibration_rows: int,
    next_calibration_rows: int,
    step: float = 1.0,
) -> DoublingVerdict:
    """:class:`DoublingVerdict` of the heads behind ``current`` (trained on twice the rows of ``previous``'s),
    both on the same validation rows, re-drawn by ``weights`` (:func:`redraws`; row 0: the rows as they are)."""
    then = previous.predicted(weights, budget, confidence, calibration_rows)
    now = current.predicted(weights, budget, confidence, calibration_rows)
    gain = then - now
    price = current.predicted(weights, budget, confidence, next_calibration_rows) - now
    net = step * gain - price
    net = net[1:] if weights.shape[0] > 1 else net
    bound = float(torch.quantile(net, STOP_CONFIDENCE))
    return DoublingVerdict(float(gain[0]), float(price[0]), bound)
