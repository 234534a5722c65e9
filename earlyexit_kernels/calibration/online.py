"""The served threshold re-certified online from the audit: looser while the traffic allows it, pulled back under drift.

    certificate = certificate_of_folder("out/", fraction=0.05)     # earlyexit_kernels.integrations.online_certificate
    predictions = eek.classify(model, texts, tokenizer=tok, audit_fraction=0.05, recertify=certificate)
    certificate.served_policy, certificate.moves, certificate.describe()

``eek fit`` certifies a threshold once, on its calibration rows, walking an ordered path of
candidates (``certified_path`` in ``eek_fit.json``, from never exiting early to the most
aggressive). The audit runs a uniform random sample of what is served at full depth; with every
head's logits recorded on those rows (:func:`~earlyexit_kernels.engine.entry.audit.full_depth_logits`
with ``all_exits``), every candidate of the path can be replayed on them without running the model
again. This module turns them into moves along the path:

- **Looser.** For each candidate, a betting e-process tests "its disagreement with the full model
  is over the budget" (:func:`~earlyexit_kernels.methods.anytime_risk.safety_log_capital`); the
  candidates are tested in the path's order (fixed-sequence testing) and the served one is the
  last of the leading run whose capital ever reached ``1 / delta`` in the current epoch (never
  one less aggressive than the folder's own in the first epoch).
- **Tighter.** An e-detector watches the served candidate
  (:func:`~earlyexit_kernels.methods.anytime_risk.alarm_log_detector`); when it reaches
  ``alarm`` the traffic has drifted to where that candidate breaks the budget: the policy is
  pulled back to the path's first candidate (full depth) and a new epoch starts, whose tests read
  only the rows audited after the pull-back.

What holds. Let the audited rows of an epoch be drawn independently from one distribution (the
traffic is stationary since the epoch started; the audit's choice is uniform, so they are drawn
like the served rows). Then with probability at least ``confidence``, at no moment of any epoch
is a candidate served on the strength of the online test whose disagreement on that traffic is
over the budget: the first epoch tests at level ``FIRST_EPOCH_SHARE * (1 - confidence)`` and epoch
``k > 1`` at ``(1 - FIRST_EPOCH_SHARE) * (1 - confidence) * 6 / (pi^2 (k - 1)^2)``, which sum to
``1 - confidence`` (pull-backs are rare: most of the level goes to the first epoch), and within an
epoch the e-processes are valid at every look. The first
epoch's floor is the folder's certificate, which holds for traffic like its calibration rows.
What does not: traffic that drifts faster than the audit sees it (the served candidate breaks the
budget from the drift until the alarm, a few hundred audited rows for a large drift); the risk is
disagreement with the full model (the audit has no labels), which bounds the accuracy lost too.

Memory: the e-processes keep a few numbers per candidate; the audited rows' logits of the
current epoch are kept for ``eek calibrate FOLDER --from-audit`` up to ``window`` rows, the
newest (``L x C`` floats a row: 20,000 rows of a 12-layer two-class model take 1.9 MB).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import disagreement
from earlyexit_kernels.methods.anytime_risk import (
    AlarmState,
    SafetyState,
    alarm_log_cusums,
    detector_of,
    safety_log_capital,
)
from earlyexit_kernels.methods.policies import DACT, ExitPolicy, QExit, SkipGates, layer_value
from earlyexit_kernels.methods.risk_control import (
    check_budget,
    check_confidence,
    check_fraction,
    draw_order_seed,
    upper_bound,
)

__all__ = [
    "ALARM",
    "WINDOW",
    "Move",
    "OnlineCertificate",
    "RecertifyError",
    "candidate_losses",
    "load_audit_record",
]

logger = logging.getLogger("earlyexit_kernels.recertify")

#: the alarm's level: false pull-backs no more often than once in this many audited rows on average
ALARM = 10_000
#: the audited rows of the current epoch kept for ``eek calibrate --from-audit``
WINDOW = 20_000
#: the latest moves kept for ``/info`` (``move_counts`` counts every one)
KEPT_MOVES = 1_000
#: the share of ``1 - confidence`` the first epoch tests at (the later epochs share the rest)
FIRST_EPOCH_SHARE = 0.9


class RecertifyError(ValueError):
    """Online re-certification cannot run as asked (no certified path, a policy it cannot replay)."""


@dataclass
class Move:
    """One move of the served policy along the path.

    ``direction``: ``"looser"`` (certified on the audit) or ``"tighter"`` (pulled back: the audit
    shows the served candidate over the budget); ``rows``: audited rows of the epoch when it moved;
    ``risk``: the disagreement the audit measured for the candidate it moved from (tighter) or to
    (looser) on those rows; ``mean_layers``: the new candidate's on them (None where unknown)."""

    direction: str
    from_index: int
    to_index: int
    from_policy: str
    to_policy: str
    epoch: int
    rows: int
    audited: int
    risk: float
    mean_layers: float | None

    def as_dict(self) -> dict:
        return dict(vars(self))

    def describe(self) -> str:
        layers = "" if self.mean_layers is None else f", {self.mean_layers:.2f} mean layers there"
        if self.direction == "looser":
            return (
                f"re-certified on {self.rows} audited rows (epoch {self.epoch}): {self.to_policy} (candidate "
                f"{self.to_index}, was {self.from_index}), disagreement {100 * self.risk:.2f}% there{layers}"
            )
        return (
            f"pulled back to full depth: the audit shows {self.from_policy} (candidate {self.from_index}) over the "
            f"budget, disagreement {100 * self.risk:.2f}% on the {self.rows} rows audited since epoch "
            f"{self.epoch} began; epoch {self.epoch + 1} re-certifies from {self.to_policy} on new rows"
        )


def _check_replayable(policy: ExitPolicy) -> None:
    if isinstance(policy, (QExit, DACT, SkipGates)):
        raise RecertifyError(
            f"online re-certification replays each candidate from the heads' logits; a {type(policy).__name__} "
            "policy also reads its halting head or gates: serve it without re-certification (--no-recertify)"
        )


def candidate_losses(path: list[ExitPolicy], all_logits: torch.Tensor, *, multi_label: bool = False):
    """Each candidate's disagreement with the full model and layers run on audited rows.

    ``all_logits`` [L, n, C]: every head's logits, the last layer's the full model's. Returns
    ``(losses [M, n] float64 in [0, 1], layers [M, n] float64)`` for the ``M`` candidates of ``path``,
    each replayed as the engine decides (:func:`~earlyexit_kernels.calibration.record.replay`)."""
    record = ExitRecord(all_logits, None, None, None, path[0])
    full = all_logits[-1].float()
    losses, layers = [], []
    for policy in path:
        out = replay(policy, record)
        losses.append(disagreement(out.logits, full, multi_label=multi_label))
        layers.append(out.layers_run.double())
    return torch.stack(losses), torch.stack(layers)


def _epoch_delta(confidence: float, epoch: int) -> float:
    """The level epoch ``epoch`` tests at; over all epochs they sum to ``1 - confidence``."""
    if epoch == 1:
        return FIRST_EPOCH_SHARE * (1.0 - confidence)
    return (1.0 - FIRST_EPOCH_SHARE) * (1.0 - confidence) * 6.0 / (math.pi**2 * (epoch - 1) ** 2)


class OnlineCertificate:
    """Re-certify the served policy along ``path`` from audited rows; thread-safe.

    ``path``: the ordered candidates (never exiting early first); ``start``: the index of the
    folder's certified candidate, the first epoch's floor; ``budget``: of disagreement with the
    full model, a fraction in (0, 1); ``confidence``: of the guarantee (module docstring);
    ``fraction``: the audit's (carried for the serving paths, which choose the rows); ``alarm``:
    the e-detector's level (:data:`ALARM`); ``window``: audited rows kept (:data:`WINDOW`).
    """

    def __init__(
        self,
        path: list[ExitPolicy],
        *,
        start: int = 0,
        budget: float,
        confidence: float = 0.95,
        fraction: float = 0.05,
        alarm: float = ALARM,
        window: int = WINDOW,
        multi_label: bool = False,
        seed: int = 0,
    ):
        if not path:
            raise RecertifyError("online re-certification needs a certified path of at least one candidate")
        for policy in path:
            _check_replayable(policy)
        if len({type(policy) for policy in path}) != 1:
            raise RecertifyError("a certified path's candidates are all of one policy family")
        budget = check_budget(budget)
        if budget <= 0.0:
            raise RecertifyError("a budget of 0 cannot be certified from a finite audit; give a positive budget")
        if not isinstance(start, int) or not 0 <= start < len(path):
            raise RecertifyError(f"start must index the path (0..{len(path) - 1}), got {start!r}")
        if not isinstance(alarm, (int, float)) or isinstance(alarm, bool) or not alarm > 1.0:
            raise RecertifyError(f"the alarm level must be a number above 1 (audited rows), got {alarm!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise RecertifyError(f"the window must be a whole number of audited rows >= 0, got {window!r}")
        self.path, self.start = list(path), start
        self.budget, self.confidence = budget, check_confidence(confidence)
        self.fraction, self.seed = check_fraction(fraction), seed
        self.alarm, self.window, self.multi_label = float(alarm), window, multi_label
        # the latest KEPT_MOVES moves (what /info shows); the counts are of every move since the start
        self.moves: deque[Move] = deque(maxlen=KEPT_MOVES)
        self.move_counts = {"looser": 0, "tighter": 0}
        self.audited = 0
        self._lock = threading.Lock()
        self._rows: deque = deque(maxlen=window)  # the epoch's audited rows' logits [L, C], newest last
        # the rows of one audited batch come in the engine's order (length-sorted within a call): the e-processes
        # read them in an order drawn without looking at them, from the operating system's entropy (kept)
        self.order_seed = draw_order_seed()
        self._order = torch.Generator().manual_seed(self.order_seed)
        self._new_epoch(1, start)

    # ------------------------------------------------------------------ what is served

    @property
    def served_index(self) -> int:
        return self._served

    @property
    def served_policy(self) -> ExitPolicy:
        return self.path[self._served]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def epoch_rows(self) -> int:
        return self._safety.rows

    def served_risk(self) -> float | None:
        """The served candidate's disagreement on the epoch's audited rows; None before any."""
        with self._lock:
            rows = self._safety.rows
            return float(self._safety.losses[self._served]) / rows if rows else None

    def bound(self) -> float:
        """The upper ``confidence`` bound (Clopper-Pearson, exact at a fixed count; a reading, not the online
        test) on the served candidate's disagreement from the epoch's audited rows; 1.0 before any."""
        with self._lock:
            rows, losses = self._safety.rows, float(self._safety.losses[self._served])
        return upper_bound(losses, rows, self.confidence, binary=not self.multi_label)

    def served_mean_layers(self) -> float | None:
        """The served candidate's mean layers on the epoch's audited rows; None before any (or unknown)."""
        with self._lock:
            rows = self._layer_rows
            return float(self._layers[self._served]) / rows if rows else None

    def thresholds(self, num_layers: int) -> list[float] | None:
        """The served policy's threshold at each layer 1..``num_layers`` (None where its family has none)."""
        threshold = getattr(self.served_policy, "threshold", None)
        if threshold is None:
            return None
        return [float(layer_value(threshold, layer)) for layer in range(1, num_layers + 1)]

    # ------------------------------------------------------------------ the audit's rows

    def record(self, all_logits: torch.Tensor) -> list[Move]:
        """Take audited rows (``all_logits`` [L, n, C], every head's logits, the last the full model's) that arrived
        together; returns the moves they made. The e-processes read them in an order drawn apart from them."""
        if all_logits.dim() != 3 or all_logits.shape[1] == 0:
            return []
        all_logits = all_logits[:, torch.randperm(all_logits.shape[1], generator=self._order)]
        losses, layers = candidate_losses(self.path, all_logits, multi_label=self.multi_label)
        return self.observe(losses, layers, logits=all_logits)

    def observe(
        self, losses: torch.Tensor, layers: torch.Tensor | None = None, *, logits: torch.Tensor | None = None
    ) -> list[Move]:
        """Take the candidates' losses [M, n] (and layers run [M, n]) on new audited rows, in order; returns the
        moves. ``logits`` [L, n, C]: the rows' head logits, kept in the window."""
        losses = losses.double()
        if losses.dim() != 2 or losses.shape[0] != len(self.path):
            raise ValueError(f"losses must be [{len(self.path)}, n] (one row per candidate), got {tuple(losses.shape)}")
        moves: list[Move] = []
        with self._lock:
            position, n = 0, losses.shape[1]
            while position < n:
                taken, move = self._advance(
                    losses[:, position:],
                    None if layers is None else layers[:, position:],
                    None if logits is None else logits[:, position:],
                    moves,
                )
                position += taken
                if move is not None:
                    moves.append(move)
            self.moves.extend(moves)
            for move in moves:
                self.move_counts[move.direction] += 1
        for move in moves:
            logger.log(logging.INFO if move.direction == "looser" else logging.WARNING, "%s", move.describe())
        return moves

    def _advance(self, losses, layers, logits, moves) -> tuple[int, Move | None]:
        """Take rows until the end or the first alarm (inclusive): ``(rows taken, the pull-back or None)``;
        the looser moves on the way go into ``moves``."""
        n, rows_before = losses.shape[1], self._safety.rows
        log_capital, safety_after = safety_log_capital(self._safety, losses, self.budget)
        log_cusum, alarm_after = alarm_log_cusums(self._alarm, losses, self.budget)
        threshold = -math.log(_epoch_delta(self.confidence, self._epoch))
        crossed = self._crossed[:, None] | torch.cummax((log_capital >= threshold).int(), 1).values.bool()
        leading = torch.cumprod(crossed.int(), 0).sum(0) - 1  # [n]: the fixed sequence's last certified
        served = torch.clamp(leading, min=self._floor)
        # the detector of the candidate served after each row
        watched = log_cusum.gather(0, served[None, None, :].expand(1, log_cusum.shape[1], n))[0]
        alarms = detector_of(watched) >= math.log(self.alarm)
        end = int(alarms.int().argmax()) + 1 if bool(alarms.any()) else n
        before_served = self._served
        if end < n:  # the states after the alarm's row, not after the chunk
            _, safety_after = safety_log_capital(self._safety, losses[:, :end], self.budget)
            _, alarm_after = alarm_log_cusums(self._alarm, losses[:, :end], self.budget)
        self._commit(losses[:, :end], None if layers is None else layers[:, :end], logits, end)
        self._safety, self._alarm = safety_after, alarm_after
        self._crossed = crossed[:, end - 1].clone()
        changed = served[:end] != torch.cat([served.new_tensor([before_served]), served[: end - 1]])
        for row in torch.nonzero(changed).flatten().tolist():
            old, new = (before_served if row == 0 else int(served[row - 1])), int(served[row])
            moves.append(self._move("looser", old, new, rows=rows_before + row + 1, risk_of=new, at=row))
        self._served = int(served[end - 1])
        if bool(alarms[end - 1]):
            pulled = self._move("tighter", self._served, 0, rows=self._safety.rows, risk_of=self._served, at=end - 1)
            self._new_epoch(self._epoch + 1, 0)
            return end, pulled
        return end, None

    def _commit(self, losses, layers, logits, end: int) -> None:
        """Count the rows taken (the statistics' states are set by the caller)."""
        self._row_losses_prefix = torch.cumsum(losses, 1)  # for the moves' numbers within this chunk
        self._row_losses_base = self._safety.losses.clone()
        if layers is not None:
            self._layers_prefix = torch.cumsum(layers, 1)
            self._layers_base = self._layers.clone()
            self._layers += layers.sum(1)
            self._layer_rows += layers.shape[1]
        else:
            self._layers_prefix = None
        if logits is not None and self.window:
            for row in logits[:, :end].unbind(1):
                self._rows.append(row.detach().to("cpu", torch.float32).clone())
        self.audited += end

    def _move(self, direction: str, old: int, new: int, *, rows: int, risk_of: int, at: int) -> Move:
        risk = float(self._row_losses_base[risk_of] + self._row_losses_prefix[risk_of, at]) / max(rows, 1)
        mean_layers = None
        if self._layers_prefix is not None and direction == "looser":
            layer_rows = self._layer_rows - self._layers_prefix.shape[1] + at + 1
            mean_layers = float(self._layers_base[new] + self._layers_prefix[new, at]) / max(layer_rows, 1)
        return Move(
            direction,
            old,
            new,
            self.path[old].to_code(4),
            self.path[new].to_code(4),
            self._epoch,
            rows,
            self.audited - self._row_losses_prefix.shape[1] + at + 1,
            risk,
            mean_layers,
        )

    def _new_epoch(self, epoch: int, floor: int) -> None:
        count = len(self.path)
        self._epoch, self._floor, self._served = epoch, floor, floor
        self._safety, self._alarm = SafetyState.start(count), AlarmState.start(count)
        self._crossed = torch.zeros(count, dtype=torch.bool)
        self._layers = torch.zeros(count, dtype=torch.float64)
        self._layer_rows = 0
        self._rows.clear()

    # ------------------------------------------------------------------ reports and the window

    def as_dict(self) -> dict:
        return {
            "served": self.served_policy.to_code(),
            "served_index": self._served,
            "start": self.start,
            "candidates": len(self.path),
            "epoch": self._epoch,
            "epoch_rows": self._safety.rows,
            "audited": self.audited,
            "budget": self.budget,
            "confidence": self.confidence,
            "risk": self.served_risk(),
            "bound": self.bound(),
            "mean_layers": self.served_mean_layers(),
            "moves": [move.as_dict() for move in self.moves],
            "move_counts": dict(self.move_counts),
        }

    def describe(self) -> str:
        risk = self.served_risk()
        seen = "no row audited yet" if risk is None else f"disagreement {100 * risk:.2f}% on them"
        return (
            f"re-certification: serving {self.served_policy.to_code(4)} (candidate {self._served} of {len(self.path)}, "
            f"the folder's {self.start}); epoch {self._epoch}, {self._safety.rows} audited rows since it began, {seen}; "
            f"{self.move_counts['looser']} moves looser, "
            f"{self.move_counts['tighter']} pulled back; budget {100 * self.budget:g}% at "
            f"{100 * self.confidence:g}%"
        )

    def window_logits(self) -> torch.Tensor | None:
        """The kept audited rows' logits [L, n, C] of the current epoch, oldest first; None when none are kept."""
        with self._lock:
            rows = list(self._rows)
        return torch.stack(rows, 1) if rows else None

    def save_audit(self, path: str | os.PathLike) -> int:
        """Write the kept rows (and what was served) to ``path`` for ``eek calibrate FOLDER --from-audit``,
        atomically; returns the rows written."""
        logits = self.window_logits()
        if logits is None:
            raise RecertifyError("no audited row is kept yet (none audited since the last pull-back, or window=0)")
        payload = {
            "all_logits": logits,
            "served": self.served_policy.to_code(),
            "path": [policy.to_code() for policy in self.path],
            "epoch": self._epoch,
            "multi_label": self.multi_label,
        }
        target = Path(path)
        handle, partial = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent or ".")
        os.close(handle)
        try:
            torch.save(payload, partial)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return logits.shape[1]


def load_audit_record(path: str | os.PathLike) -> dict:
    """What :meth:`OnlineCertificate.save_audit` wrote, checked: ``all_logits`` [L, n, C] and the path codes."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:  # torch's unpickler fails in many ways on a file it did not write
        raise RecertifyError(f"--from-audit {path}: not an audit record written by the server ({error})") from None
    logits = payload.get("all_logits") if isinstance(payload, dict) else None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] == 0:
        raise RecertifyError(f"--from-audit {path}: no audited rows' logits [L, n, C] in it")
    return payload
