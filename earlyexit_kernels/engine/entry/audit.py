"""The audit watch: a random fraction of the sequences served also run at full depth, and their disagreement is watched.

(Past 600 lines: the audit's settings, the watch that counts and bounds with them and the runner that feeds it are
one idea, read together; most of it is the watch's two bounds and their warnings.)

    watch = AuditWatch(0.05, budget=0.01, confidence=0.95)   # 5% of the sequences, a 1% budget
    watch = AuditWatch(AuditConfig(0.05, budget=0.01))        # the same, from its settings object
    predictions = eek.classify(model, texts, tokenizer=tok, audit=watch)
    ...
    watch.audited, watch.disagreements, watch.rate, watch.bound()

Calibration (``eek fit``) certifies that, with probability ``confidence`` over the draw of its
calibration rows, the early exit's disagreement with the full model (or the accuracy it loses)
stays within a budget *on rows drawn like the calibration rows*. A shift in what is served voids
that; the watch measures the disagreement on what is served instead.

- **Which sequences.** Each independently, with probability ``fraction``, from a seeded
  :class:`random.Random` (:meth:`AuditWatch.choose`): the audited sequences are a uniform sample
  of what is served, whatever their content, so the counts estimate the served risk.
- **What is counted.** Per audited sequence, the loss of calibration's ``"agreement"`` risk
  (:func:`~earlyexit_kernels.calibration.row_losses.disagreement`): 1 when the early exit predicts another class than the full model
  (argmax), else 0; multi-label (``problem_type="multi_label_classification"``): the fraction of
  labels decided otherwise (logit above or below 0), as calibration counts it; one output
  (``num_labels == 1``, a cross-encoder): whether the score falls on the other side of 0
  (sigmoid 0.5). ``disagreements`` is their sum.
- **The bound.** :meth:`AuditWatch.bound`: the upper ``confidence`` bound on the served risk,
  Clopper-Pearson while every loss is 0 or 1, Hoeffding-Bentkus once one is a fraction: the
  bound of :func:`earlyexit_kernels.methods.risk_control.upper_bound`, which calibration
  certifies with.
- **The warning.** With a budget, a ``logging`` warning (logger ``earlyexit_kernels.audit``),
  once per crossing, when the disagreements pass the budget: when they show the served risk over
  it, i.e. when its lower ``confidence`` bound passes the budget (the p-value of "risk <= budget"
  falls to ``1 - confidence``). The numbers are in the message. Once the upper bound is back at or
  under the budget, an ``info`` line says so and the next crossing warns again. Not the upper
  bound passing the budget: that one is above it whenever the audited sequences are too few to
  certify the budget (with no disagreement at all, ``log(1 - confidence) / log(1 - budget)``
  sequences: 299 for 1% at 95%) and hovers around it for a while after it first comes under, so
  it would warn of a healthy model. Simulated (20 random streams of 20,000 sequences per risk, a
  1% budget at 95%, counts recorded 16 at a time): at half the budget the upper bound passing it
  warned in 9 streams (29 warnings), the lower bound in none; at 0.9 times the budget the lower
  bound warned in 2; at 1.5 times in all 20 (the last after 7,056 sequences), at 2 times in all 20
  (within 848; ``benchmarks/archive/audit_warning_rule.py``). The upper bound is
  :meth:`AuditWatch.bound` and the server's metric, to alert on where the budget must stay certified.

**With labels.** Disagreement is not what a certificate on accuracy lost (``eek fit`` with labels)
bounds: disagreements that cancel (the exit right where the full model is wrong, and the reverse)
cost no accuracy. Where a label is known for an audited row (the server's ``POST /feedback``), the
watch counts that row's paired accuracy loss (:func:`~earlyexit_kernels.calibration.row_losses.paired_loss`: 1 where the exit is
wrong and the full model right, -1 for the reverse, else 0), the very loss calibration certified,
and bounds its mean, the accuracy points lost, above with the betting bound calibration certifies
with (:func:`~earlyexit_kernels.methods.risk_control.paired_upper_bound`). Against
``accuracy_budget`` (the certificate's) it warns by the same rule as the disagreement: when the
lower bound passes the budget (the betting test of "lost <= budget" on the negated losses), and
says when the upper bound is back under it. The mean, the bound and the warning read the latest
:data:`PAIRED_WINDOW` labelled rows (65,536: half a MiB, and what the traffic does now rather than
since the start), the counts every one. Without labels the disagreement is reported, with no
budget from such a certificate (:func:`earlyexit_kernels.integrations.model_folder.audit_settings`).

The full model is the model's class's own forward (:func:`full_depth_logits`): the same weights,
unpatched, without copying them.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.online import OnlineCertificate
from earlyexit_kernels.calibration.row_losses import disagreement
from earlyexit_kernels.methods.policies import MULTI_LABEL
from earlyexit_kernels.methods.risk_control import (
    betting_p_value,
    binomial_cdf,
    check_confidence,
    check_fraction,
    count_p_value,
    kl_bernoulli,
    paired_upper_bound,
    upper_bound,
)

__all__ = [
    "AUDIT_OPTIONS",
    "AuditConfig",
    "AuditRunner",
    "AuditWatch",
    "PAIRED_WINDOW",
    "audit_config",
    "check_audit_budget",
    "check_audit_confidence",
    "full_depth_logits",
    "upper_bound",
]

logger = logging.getLogger("earlyexit_kernels.audit")

#: the latest labelled audited rows the accuracy lost is read on (a server keeps no more of them)
PAIRED_WINDOW = 65_536
#: AuditWatch's config not given: its fields are (``AuditWatch(fraction=0.05)``)
_FIELDS = object()


def check_audit_confidence(confidence: float) -> float:
    """``confidence`` as a float, or a ``ValueError`` saying what a valid one is (the bound is
    :func:`~earlyexit_kernels.methods.risk_control.check_confidence`'s; the words say what it is for here)."""
    try:
        return check_confidence(confidence)
    except ValueError:
        raise ValueError(
            f"the audit confidence must be a probability strictly between 0 and 1 (0.95: the bound holds "
            f"with probability 95%), got {confidence!r}"
        ) from None


def check_audit_budget(budget: float | None) -> float | None:
    """``budget`` (a fraction, or None) as a float, or a ``ValueError`` saying what a valid one is."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget < 1.0:
        raise ValueError(
            f"the audit budget must be a fraction of sequences in [0, 1) (0.01: one in a hundred), got {budget!r}"
        )
    return float(budget)


@dataclass(frozen=True)
class AuditConfig:
    """The audit's settings, each checked here once (a ``ValueError`` saying what a valid one is): what
    :class:`AuditWatch` watches with, and what a server's settings hold
    (:class:`~earlyexit_kernels.integrations.server.serve_settings.ServeSettings`' ``audit``).

    ``fraction`` (in [0, 1]): the share of sequences, drawn at random, also run through the full model (0: none
    is drawn; a server's audit is None for no audit). ``budget`` (a fraction in [0, 1), or None: no budget, no
    warning): the disagreement with the early exit is watched against it, with its upper ``confidence`` bound
    (in (0, 1)). ``seed``: of the draw. ``accuracy_budget`` (a fraction in [0, 1), or None: reported, no warning):
    the accuracy lost the labelled audited rows are watched against (a server's ``POST /feedback``), usually the
    certificate's of a folder certified on accuracy lost. ``source``: where ``budget`` and ``confidence`` came
    from, what ``eek serve``'s audit line says.
    """

    fraction: float
    budget: float | None = None
    confidence: float = 0.95
    seed: int = 0
    accuracy_budget: float | None = None
    source: str = "as given"

    def __post_init__(self):
        object.__setattr__(self, "fraction", check_fraction(self.fraction))
        object.__setattr__(self, "budget", check_audit_budget(self.budget))
        object.__setattr__(self, "confidence", check_audit_confidence(self.confidence))
        object.__setattr__(self, "accuracy_budget", check_audit_budget(self.accuracy_budget))


#: the audit's options as the entry points name them (``eek.classify``'s ``audit_fraction``, ``create_app``'s and
#: ``eek serve``'s, Ray's ``ClassifierSettings``), and the :class:`AuditConfig` field each sets
AUDIT_OPTIONS = {
    "audit_fraction": "fraction",
    "audit_budget": "budget",
    "audit_confidence": "confidence",
    "audit_seed": "seed",
    "audit_accuracy_budget": "accuracy_budget",
}


def audit_config(options: Mapping, **fields) -> AuditConfig | None:
    """The :class:`AuditConfig` of ``options`` named as :data:`AUDIT_OPTIONS` names them (others are not read; None:
    not given, the field's default), with ``fields`` (the config's own names) set over them; None where
    ``audit_fraction`` is 0 or not given: no audit."""
    if check_fraction(options.get("audit_fraction", 0.0)) == 0:
        return None
    given = {field: options[name] for name, field in AUDIT_OPTIONS.items() if options.get(name) is not None}
    return AuditConfig(**{**given, **fields})


# ---------------------------------------------------------------------------------- the loss


def is_multi_label(config) -> bool:
    return getattr(config, "problem_type", None) == MULTI_LABEL


# ---------------------------------------------------------------------------------- the full model


def full_depth_logits(
    model,
    sequences: Sequence[tuple[Sequence[int], Sequence[int] | None]],
    *,
    max_batch_size: int = 64,
    max_tokens: int | None = None,
    all_exits: bool = False,
) -> torch.Tensor:
    """The full model's logits [n, C] (float32, CPU) for ``sequences`` of ``(input_ids, token_type_ids or None)``.

    ``all_exits``: every layer's head logits too, [L, n, C], the last layer's the full model's: the
    patched model's all-exits forward (every layer on every row, the model's own classifier last),
    what online re-certification replays its candidates on
    (:mod:`~earlyexit_kernels.calibration.online`).

    It runs the model's class's own forward on the patched model: the unpatched Hugging Face
    forward on the same weights (``eek.patch`` replaces the instance's ``forward`` only), with no
    copy of the weights (``eek.unpatch(copy.deepcopy(model))`` would double them) and none of the
    early exit's bookkeeping, so it costs what the plain model costs. Sequences run in
    length-sorted batches of at most ``max_batch_size`` rows and ``max_tokens`` rows x padded
    length, right-padded with the model's pad token.
    """
    forward = type(model).forward
    takes_types = "token_type_ids" in inspect.signature(forward).parameters
    if all_exits:

        def forward(model, **inputs):
            return model(**inputs, return_all_exits=True)

    pad = getattr(model.config, "pad_token_id", None) or 0
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    chunks, chunk = [], []
    for i in order:  # ascending lengths: the newest row is the longest of its chunk
        rows = len(chunk) + 1
        if chunk and (rows > max_batch_size or (max_tokens is not None and rows * len(sequences[i][0]) > max_tokens)):
            chunks.append(chunk)
            chunk = []
        chunk.append(i)
    if chunk:
        chunks.append(chunk)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    with torch.inference_mode():
        for chunk in chunks:
            length = max(len(sequences[i][0]) for i in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            types = torch.zeros((len(chunk), length), dtype=torch.long)
            any_types = False
            for row, i in enumerate(chunk):
                tokens, token_types = sequences[i]
                n = len(tokens)
                ids[row, :n] = torch.as_tensor(tokens, dtype=torch.long)
                mask[row, :n] = 1
                if token_types is not None:
                    types[row, :n] = torch.as_tensor(token_types, dtype=torch.long)
                    any_types = True
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if takes_types and any_types:
                inputs["token_type_ids"] = types.to(device)
            output = forward(model, **inputs)
            logits = (output.all_logits if all_exits else output.logits).float().cpu()
            for row, i in enumerate(chunk):
                out[i] = logits[:, row] if all_exits else logits[row]
    if not out:
        return torch.empty(0)
    return torch.stack(out, 1 if all_exits else 0)


# ---------------------------------------------------------------------------------- the watch


class _Alarm:
    """One bound's warning, with hysteresis: raised once when the audited rows come to show the risk over its budget,
    then quiet until the bound is back at or under the budget (an info line says so), and so on."""

    def __init__(self):
        self.over = False  # raised, and the bound not back at or under the budget since
        self.raised = 0

    def crossing(self, still_over, shown_over) -> str | None:
        """``"raised"``, ``"back"`` or None: ``still_over()`` (the bound still over the budget) is asked while raised,
        ``shown_over()`` (the test rejects the budget) otherwise."""
        if self.over:
            if still_over():
                return None
            self.over = False
            return "back"
        if not shown_over():
            return None
        self.over, self.raised = True, self.raised + 1
        return "raised"


class AuditWatch:
    """The policy of the audit: which sequences run at full depth too, what they show, when to warn.

    Its settings: one :class:`AuditConfig` (``AuditWatch(AuditConfig(0.05, budget=0.01))``), or its fields
    as keywords, the fraction first (``AuditWatch(0.05, budget=0.01)``), which make one; ``config`` is
    that object, and ``fraction``, ``budget``, ``confidence``, ``seed`` and ``accuracy_budget`` read it.
    ``fraction``: the probability that a sequence is audited, in [0, 1]. ``budget``: the risk
    budget, a fraction (0.01: 1%), usually the certificate's of ``eek_fit.json``; None: no budget,
    the watch counts and bounds but never warns. ``confidence``: of the bound (0.95). ``seed``:
    of the choice of sequences. Thread-safe: a server chooses on one thread and records on another.

    ``audited``: sequences compared; ``disagreements``: the sum of their losses; ``warnings``:
    crossings warned; ``full_seconds``: the time the full model took for them (as recorded).
    """

    def __init__(self, config: AuditConfig | float = _FIELDS, /, **fields):
        if isinstance(config, AuditConfig):
            if fields:
                raise TypeError("AuditWatch takes its config once: an AuditConfig or its fields, not both")
        else:
            config = AuditConfig(**fields) if config is _FIELDS else AuditConfig(config, **fields)
        self.config = config
        # the paired losses of the latest PAIRED_WINDOW labelled audited rows, in the order recorded (the
        # bound and the warning read them); the counts are over every labelled row
        self._paired: deque[int] = deque(maxlen=PAIRED_WINDOW)
        self._labelled = self._wrong_right = self._right_wrong = 0
        self._accuracy_alarm = _Alarm()
        self._accuracy_cache: tuple[int, float] | None = None
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self.audited = 0
        self.disagreements = 0.0
        self.binary = True  # every loss so far 0 or 1 (then the bound is Clopper-Pearson's)
        self.full_seconds = 0.0
        self.skipped = 0
        self._alarm = _Alarm()
        self._bound_cache: tuple[tuple, float] | None = None

    @property
    def fraction(self) -> float:
        return self.config.fraction

    @property
    def budget(self) -> float | None:
        return self.config.budget

    @property
    def confidence(self) -> float:
        return self.config.confidence

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def accuracy_budget(self) -> float | None:
        return self.config.accuracy_budget

    def __repr__(self) -> str:
        budget = "none" if self.budget is None else f"{100 * self.budget:g}%"
        return (
            f"AuditWatch(fraction={self.fraction:g}, budget={budget}, confidence={self.confidence:g}: "
            f"{self.audited} audited, {self.disagreements:g} disagreements)"
        )

    def choose(self) -> bool:
        """Whether the next sequence is audited (a draw of the seeded generator)."""
        if not self.fraction:  # 0: none is drawn
            return False
        with self._lock:
            return self._random.random() < self.fraction

    def skip(self, count: int = 1) -> None:
        """``count`` sequences chosen but not audited (a server whose audit queue was full)."""
        with self._lock:
            self.skipped += count

    def record(self, losses: Iterable[float], *, seconds: float = 0.0) -> None:
        """Count the losses (in [0, 1]) of audited sequences; ``seconds``: the full model's time for
        them. Warns or says it is back under the budget where the bound crosses it."""
        losses = [float(loss) for loss in losses]
        if any(not 0.0 <= loss <= 1.0 for loss in losses):
            raise ValueError(f"audit losses must lie in [0, 1], got {losses}")
        with self._lock:
            self.full_seconds += seconds
            if not losses:
                return
            self.audited += len(losses)
            self.disagreements += math.fsum(losses)
            self.binary = self.binary and all(loss in (0.0, 1.0) for loss in losses)
            message = self._crossing()
        if message is not None:
            level, text = message
            logger.log(level, text)

    def record_labelled(self, losses: Iterable[int]) -> None:
        """Count the paired accuracy losses (:func:`~earlyexit_kernels.calibration.row_losses.paired_loss`: -1, 0 or 1) of audited rows
        whose labels are known. Warns or says it is back under ``accuracy_budget`` where the bound crosses it."""
        losses = [int(loss) for loss in losses]
        if any(loss not in (-1, 0, 1) for loss in losses):
            raise ValueError(f"paired accuracy losses are -1, 0 or 1, got {losses}")
        if not losses:
            return
        with self._lock:
            self._paired.extend(losses)
            self._labelled += len(losses)
            self._wrong_right += losses.count(1)
            self._right_wrong += losses.count(-1)
            paired = list(self._paired)
        message = self._accuracy_crossing(paired)
        if message is not None:
            level, text = message
            logger.log(level, text)

    @property
    def labelled(self) -> int:
        """Audited rows whose label is known (counted on accuracy lost), since the start."""
        return self._labelled

    @property
    def exit_wrong_full_right(self) -> int:
        return self._wrong_right

    @property
    def exit_right_full_wrong(self) -> int:
        return self._right_wrong

    @property
    def accuracy_window(self) -> int:
        """The labelled audited rows the accuracy lost, its bound and its warning are read on: the latest
        :data:`PAIRED_WINDOW` (all of them until there are more)."""
        return len(self._paired)

    @property
    def accuracy_lost(self) -> float | None:
        """The accuracy the early exit lost against the full model on the latest :data:`PAIRED_WINDOW` labelled
        audited rows (a fraction: 0.01 is one point; negative where it gained); None before any."""
        with self._lock:
            return sum(self._paired) / len(self._paired) if self._paired else None

    def accuracy_bound(self) -> float:
        """The upper ``confidence`` bound on the accuracy lost (betting, as calibration's); 1.0 before any row."""
        with self._lock:
            paired = list(self._paired)
            cached = self._accuracy_cache
            seen = self._labelled
        if not paired:
            return 1.0
        if cached is not None and cached[0] == seen:
            return cached[1]
        value = paired_upper_bound(torch.tensor(paired, dtype=torch.float64), self.confidence)
        with self._lock:
            self._accuracy_cache = (seen, value)
        return value

    @property
    def warnings(self) -> int:
        """The disagreement's crossings over the budget warned."""
        return self._alarm.raised

    @property
    def accuracy_warnings(self) -> int:
        """The accuracy lost's crossings over its budget warned."""
        return self._accuracy_alarm.raised

    @property
    def accuracy_over_budget(self) -> bool | None:
        """Whether the labelled rows show the accuracy lost over ``accuracy_budget`` (its lower
        ``confidence`` bound above it: what the warning says); None without that budget."""
        if self.accuracy_budget is None:
            return None
        with self._lock:
            paired = list(self._paired)
        return self._accuracy_shown_over(paired)

    def _accuracy_shown_over(self, paired: list[int]) -> bool:
        """The betting test of "lost <= budget" (on the negated losses) rejected at ``1 - confidence``."""
        if not paired:
            return False
        negated = -torch.tensor(paired, dtype=torch.float64)
        return betting_p_value(negated, -self.accuracy_budget) <= 1.0 - self.confidence

    def _accuracy_crossing(self, paired: list[int]) -> tuple[int, str] | None:
        budget = self.accuracy_budget
        if budget is None:
            return None
        crossing = self._accuracy_alarm.crossing(
            lambda: self.accuracy_bound() > budget, lambda: self._accuracy_shown_over(paired)
        )
        if crossing is None:
            return None
        if crossing == "back":
            return logging.INFO, f"audit: accuracy lost back within the budget: {self._accuracy_numbers()}"
        return (
            logging.WARNING,
            f"audit: the early exit loses more accuracy against the full model than its certificate's budget of "
            f"{100 * budget:g} points allows, measured on the audited rows with labels: {self._accuracy_numbers()}. "
            f"What is served may have shifted away from the calibration rows, whose guarantee covers rows like them "
            f"only",
        )

    def _accuracy_numbers(self) -> str:
        with self._lock:  # another thread may be recording labels
            n, window = self._labelled, list(self._paired)
        on = (
            f"{n} labelled audited rows"
            if len(window) == n
            else f"the latest {len(window)} of {n} labelled audited rows"
        )
        return (
            f"{100 * self.accuracy_lost:.2f} points lost on {on} (the exit wrong where the full "
            f"model was right on {window.count(1)}, right where it was wrong on "
            f"{window.count(-1)}), upper {100 * self.confidence:g}% bound {100 * self.accuracy_bound():.2f} "
            f"points"
        )

    @property
    def rate(self) -> float | None:
        """The observed disagreement (a fraction); None before any audited sequence."""
        with self._lock:
            return self.disagreements / self.audited if self.audited else None

    def bound(self) -> float:
        """The upper ``confidence`` bound on the served disagreement; 1.0 before any audited sequence."""
        with self._lock:
            key = (self.disagreements, self.audited, self.binary)
            if self._bound_cache is not None and self._bound_cache[0] == key:
                return self._bound_cache[1]
        value = upper_bound(key[0], key[1], self.confidence, binary=key[2])
        with self._lock:
            self._bound_cache = (key, value)
        return value

    @property
    def within_budget(self) -> bool | None:
        """Whether the served traffic certifies the budget now (the bound at or under it); None without a budget."""
        if self.budget is None:
            return None
        with self._lock:
            return not self._bound_over(self.budget)

    @property
    def over_budget(self) -> bool | None:
        """Whether the disagreements show the served risk over the budget now (its lower ``confidence``
        bound above it: what the warning says); None without a budget."""
        if self.budget is None:
            return None
        with self._lock:
            return self._shown_over(self.budget)

    def as_dict(self) -> dict:
        """The watch's settings and counts, with the rate, the bound and where they stand against the budget."""
        return {
            "fraction": self.fraction,
            "budget": self.budget,
            "confidence": self.confidence,
            "audited": self.audited,
            "disagreements": self.disagreements,
            "rate": self.rate,
            "bound": self.bound(),
            "within_budget": self.within_budget,
            "over_budget": self.over_budget,
            "skipped": self.skipped,
            "full_seconds": self.full_seconds,
            "accuracy_budget": self.accuracy_budget,
            "labelled": self.labelled,
            "accuracy_lost": self.accuracy_lost,
            "accuracy_bound": self.accuracy_bound(),
            "accuracy_over_budget": self.accuracy_over_budget,
        }

    def describe(self) -> str:
        """One line: what was audited, the disagreement, its bound, against the budget."""
        if not self.audited:
            return f"audit: no sequence audited (fraction {self.fraction:g})"
        versus = ""
        if self.budget is not None:
            if self.over_budget:
                versus = f": OVER the budget of {100 * self.budget:g}% (the disagreements show it)"
            elif self.within_budget:
                versus = f": within the budget of {100 * self.budget:g}%"
            else:
                versus = f": not yet shown within the budget of {100 * self.budget:g}% (too few sequences)"
        return (
            f"audit: {self.audited} sequences also run by the full model (fraction {self.fraction:g}), "
            f"disagreement {100 * self.rate:.2f}%, upper {100 * self.confidence:g}% bound "
            f"{100 * self.bound():.2f}%{versus}"
        )

    # the crossing rule (under the lock)

    def _bound_over(self, budget: float) -> bool:
        """``bound() > budget``, from one p-value (the bound is where the p-value falls to 1 - confidence)."""
        return count_p_value(self.disagreements, self.audited, budget, binary=self.binary) > 1.0 - self.confidence

    def _shown_over(self, budget: float) -> bool:
        """Whether the losses show the risk over ``budget``: the p-value of "risk <= budget" at most
        ``1 - confidence`` (the lower ``confidence`` bound above the budget): ``count_p_value``'s tests
        applied to one minus the losses, written so that they sum ``n x rate`` terms, not ``n``."""
        n = self.audited
        if n <= 0:
            return False
        losses = self.disagreements
        if self.binary:  # P(Binomial(n, budget) >= losses)
            p_value = 1.0 - binomial_cdf(round(losses) - 1, n, budget)
        elif budget <= 0.0:
            p_value = 0.0 if losses > 0 else 1.0
        else:  # Hoeffding-Bentkus on 1 - loss against 1 - budget
            mean = losses / n
            hoeffding = math.exp(-n * kl_bernoulli(max(mean, budget), budget))
            bentkus = math.e * (1.0 - binomial_cdf(math.floor(n * mean + 1e-9) - 1, n, budget))
            p_value = min(1.0, hoeffding, bentkus)
        return p_value <= 1.0 - self.confidence

    def _crossing(self) -> tuple[int, str] | None:
        """The message to log after new losses, if any: a warning when the disagreements come to show
        the risk over the budget (once, until the bound is back at or under it: then an info line)."""
        budget = self.budget
        if budget is None:
            return None
        crossing = self._alarm.crossing(lambda: self._bound_over(budget), lambda: self._shown_over(budget))
        if crossing is None:
            return None
        if crossing == "back":
            return logging.INFO, f"audit: back within the budget: {self._numbers()}"
        return (
            logging.WARNING,
            f"audit: the early exit disagrees with the full model more often than its budget of {100 * budget:g}% "
            f"allows: {self._numbers()}. What is served may have shifted away from the calibration rows, whose "
            f"guarantee covers rows like them only",
        )

    def _numbers(self) -> str:
        n, losses = self.audited, self.disagreements
        bound = upper_bound(losses, n, self.confidence, binary=self.binary)
        return (
            f"{losses:g} of {n} audited sequences ({100 * losses / n:.2f}%), upper {100 * self.confidence:g}% "
            f"bound {100 * bound:.2f}%"
        )


# ---------------------------------------------------------------------------------- the runner


class AuditRunner:
    """The full model on audited sequences and their losses in the watch: the one audit runner of
    ``eek.classify`` (which runs it in the stream, :func:`earlyexit_kernels.engine.entry.classify.classify`)
    and of the server (which runs it on a thread of its own, :mod:`earlyexit_kernels.integrations.server.audit_worker`).

    :meth:`full_logits` runs the full model (:func:`full_depth_logits`; with ``certificate``, an
    :class:`~earlyexit_kernels.calibration.online.OnlineCertificate`, its all-exits forward,
    every head's logits recorded in the certificate, and ``on_move(policy)`` called when it moves the
    served policy); :meth:`record` counts the early exits' losses against it in ``watch``, with the
    full model's time since the last record.
    """

    def __init__(
        self,
        model,
        watch: AuditWatch,
        *,
        max_batch_size: int = 64,
        max_tokens: int | None = None,
        certificate: OnlineCertificate | None = None,
        on_move=None,
        multi_label: bool | None = None,
    ):
        self.model, self.watch, self.certificate, self.on_move = model, watch, certificate, on_move
        self.max_batch_size, self.max_tokens = max_batch_size, max_tokens
        self.multi_label = is_multi_label(model.config) if multi_label is None else multi_label
        self._seconds = 0.0  # the full model's time not yet recorded

    def full_logits(self, sequences: Sequence[tuple[Sequence[int], Sequence[int] | None]]) -> torch.Tensor:
        """The full model's logits [n, C] for ``sequences`` of ``(input_ids, token_type_ids or None)``."""
        start = time.perf_counter()
        logits = full_depth_logits(
            self.model,
            sequences,
            max_batch_size=self.max_batch_size,
            max_tokens=self.max_tokens,
            all_exits=self.certificate is not None,
        )
        self._seconds += time.perf_counter() - start
        if self.certificate is None:
            return logits
        if self.certificate.record(logits) and self.on_move is not None:
            self.on_move(self.certificate.served_policy)
        return logits[-1]

    def losses(self, early: torch.Tensor, full: torch.Tensor) -> list[float]:
        """Each row's loss between the early exits' ``early`` and the full model's ``full`` logits [n, C]."""
        return disagreement(early, full, multi_label=self.multi_label).tolist()

    def record(self, losses: list[float]) -> None:
        """Count ``losses`` in the watch, with the full model's time since the last record."""
        if losses or self._seconds:
            self.watch.record(losses, seconds=self._seconds)
            self._seconds = 0.0
