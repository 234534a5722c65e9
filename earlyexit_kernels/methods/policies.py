"""Exit policies: what decides that a sequence leaves the encoder.

Every policy is a frozen dataclass validated when it is built (bad values raise
``ValueError``). What can only be checked against a model (one threshold per
layer, a regression head, the length of a schedule) is checked by
:meth:`ExitPolicy.check_fits` when the policy is attached with ``eek.patch``.
The semantics of each rule are in ``docs/exit_methods.md``; the
executable form is :mod:`earlyexit_kernels.methods.exit_rules`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

__all__ = [
    "ExitPolicy",
    "Entropy",
    "MaxProb",
    "Patience",
    "QExit",
    "Voting",
    "DACT",
    "SkipGates",
    "Scheduled",
    "MultiLabelConfidence",
    "ScoreBand",
    "MULTI_LABEL",
]

#: ``config.problem_type`` of a multi-label classifier (independent sigmoid outputs)
MULTI_LABEL = "multi_label_classification"


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _per_layer_floats(owner: str, name: str, value, *, low: float, high: float, low_open: bool):
    """Normalise a float-or-sequence field to a float or a tuple of floats, checking the range."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()  # a 0-d tensor is one number, not a sequence
    values = list(value) if isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, str) else [value]
    if not values:
        raise ValueError(f"{owner}: {name} must be a number or a non-empty sequence of numbers, got an empty sequence")
    checked = []
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.item()
        if not _is_real(v) or not math.isfinite(v):
            raise ValueError(f"{owner}: {name} must be finite numbers, got {v!r}")
        too_low = v <= low if low_open else v < low
        if too_low or v > high:
            bracket = "(" if low_open else "["
            raise ValueError(f"{owner}: {name} must lie in {bracket}{low}, {high}], got {v!r}")
        checked.append(float(v))
    is_sequence = isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, str)
    return tuple(checked) if is_sequence else checked[0]


def _check_per_layer_length(owner: str, name: str, value, num_layers: int) -> None:
    if isinstance(value, tuple) and len(value) != num_layers:
        raise ValueError(
            f"{owner}: {name} has {len(value)} values but the model has {num_layers} layers; "
            f"pass one value per layer or a single number"
        )


def _require_distribution(owner: str, num_labels: int) -> None:
    if num_labels < 2:
        raise ValueError(
            f"{owner} needs a classification head (num_labels >= 2) but the model has num_labels={num_labels}; "
            f"for regression use Patience(patience, regression_threshold=0.1), QExit or Scheduled"
        )


def _round(value, digits: int):
    """``value`` (a float, a tuple of floats, anything else) with its floats at ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, tuple):
        return tuple(_round(v, digits) for v in value)
    return value


def _compares_classes(policy) -> bool:
    """Patience on a classification head compares argmax predictions."""
    return isinstance(policy, Patience) and not policy.is_regression


def layer_value(value, layer: int) -> float:
    """The value that applies at 1-based ``layer`` of a float-or-per-layer field."""
    return value[layer - 1] if isinstance(value, tuple) else value


class ExitPolicy:
    """Base class of every exit policy."""

    #: extra heads the policy needs beyond the per-layer classifiers
    needs_halting_head = False
    needs_skip_gates = False
    #: the policy's rule is a probability distribution over classes
    needs_distribution = False

    def check_fits(self, num_layers: int, num_labels: int) -> None:
        """Raise ``ValueError`` when the policy cannot run on a model of this shape."""
        if self.needs_distribution:
            _require_distribution(type(self).__name__, num_labels)

    def check_problem_type(self, problem_type: str | None) -> None:
        """Raise ``ValueError`` when the policy's rule means nothing for ``config.problem_type``.

        A multi-label model's outputs are independent sigmoids: a rule that reads a softmax
        over the labels or their argmax is refused, naming :class:`MultiLabelConfidence`.
        """
        if problem_type == MULTI_LABEL and (self.needs_distribution or _compares_classes(self)):
            raise ValueError(
                f"{type(self).__name__} reads a softmax (or the argmax) over the labels, which means nothing for a "
                f"multi-label model (config.problem_type={MULTI_LABEL!r}: one independent sigmoid per label); "
                f"use eek.MultiLabelConfidence(0.9) (every label's probability at most 0.1 or at least 0.9), "
                f"QExit or Scheduled"
            )

    def to_code(self, digits: int | None = None) -> str:
        """The Python code that builds this policy: ``Entropy(0.3)``, ``SkipGates(entropy_threshold=0.3)``.

        Required fields are written positionally, the others as keywords and only where
        they differ from their default. With ``digits=None`` floats are written exactly
        (``eval`` in the namespace of ``earlyexit_kernels`` gives an equal policy, and
        :func:`earlyexit_kernels.methods.policy_spec.parse_policy` reads it); ``digits`` rounds
        them to that many significant digits, for tables.
        """

        if digits is not None:
            # the fewest digits from ``digits`` on whose rounded values still build a valid policy
            # (0.999999 rounds to 1, which QExit refuses)
            for tried in range(digits, 17):
                rounded = {
                    f.name: _round(getattr(self, f.name), tried) for f in fields(self) if f.name != "exit_layers"
                }
                try:
                    replace(self, **rounded)
                except ValueError:
                    continue
                digits = tried
                break
            else:
                digits = None

        def number(value) -> str:
            if isinstance(value, float):
                return repr(value) if digits is None else f"{value:.{digits}g}"
            if isinstance(value, tuple):
                inner = ", ".join(number(v) for v in value)
                return f"({inner},)" if len(value) == 1 else f"({inner})"
            if isinstance(value, torch.Tensor):
                return repr(value.tolist())
            return repr(value)

        arguments = []
        keywords_only = False
        for f in fields(self):
            value = getattr(self, f.name)
            required = f.default is MISSING and f.default_factory is MISSING
            if required and not keywords_only:
                arguments.append(number(value))
                continue
            keywords_only = True
            default = f.default
            if not required and (value is default or (type(value) is type(default) and value == default)):
                continue
            arguments.append(f"{f.name}={number(value)}")
        return f"{type(self).__name__}({', '.join(arguments)})"

    def __repr__(self) -> str:
        return self.to_code()


@dataclass(frozen=True, repr=False)
class Entropy(ExitPolicy):
    """DeeBERT: exit when the entropy of the layer's prediction is below ``threshold``.

    ``threshold`` is one float or one per layer. With ``normalized=True`` the entropy is
    divided by ``ln C`` (FastBERT), so thresholds lie in [0, 1].
    """

    threshold: float | tuple[float, ...]
    normalized: bool = False
    needs_distribution = True

    def __post_init__(self):
        object.__setattr__(
            self,
            "threshold",
            _per_layer_floats("Entropy", "threshold", self.threshold, low=0.0, high=1e9, low_open=False),
        )
        if not isinstance(self.normalized, bool):
            raise ValueError(f"Entropy: normalized must be True or False, got {self.normalized!r}")

    def check_fits(self, num_layers, num_labels):
        super().check_fits(num_layers, num_labels)
        _check_per_layer_length("Entropy", "threshold", self.threshold, num_layers)


@dataclass(frozen=True, repr=False)
class MaxProb(ExitPolicy):
    """RightTool: exit when the largest class probability reaches ``threshold``.

    ``temperature`` (one float or one per layer, > 0) divides the logits before the
    softmax, for calibrated heads.
    """

    threshold: float | tuple[float, ...]
    temperature: float | tuple[float, ...] | None = None
    needs_distribution = True

    def __post_init__(self):
        object.__setattr__(
            self,
            "threshold",
            _per_layer_floats("MaxProb", "threshold", self.threshold, low=0.0, high=1.0, low_open=False),
        )
        if self.temperature is not None:
            object.__setattr__(
                self,
                "temperature",
                _per_layer_floats("MaxProb", "temperature", self.temperature, low=0.0, high=1e9, low_open=True),
            )

    def check_fits(self, num_layers, num_labels):
        super().check_fits(num_layers, num_labels)
        _check_per_layer_length("MaxProb", "threshold", self.threshold, num_layers)
        if self.temperature is not None:
            _check_per_layer_length("MaxProb", "temperature", self.temperature, num_layers)


@dataclass(frozen=True, repr=False)
class Patience(ExitPolicy):
    """PABEE: exit once ``patience`` consecutive layers agree with the one before them.

    Classification compares argmax predictions; regression (``num_labels == 1``) needs
    ``regression_threshold`` and counts layers whose output moved by less than it.
    The earliest exit is layer ``patience + 1``, so on ``L`` layers ``patience`` lies in
    ``1..L-1``; ``L - 1`` is met at the last layer only (no early exit).
    """

    patience: int
    regression_threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.patience, numbers.Integral) or isinstance(self.patience, bool) or self.patience < 1:
            raise ValueError(f"Patience: patience must be an integer >= 1, got {self.patience!r}")
        object.__setattr__(self, "patience", int(self.patience))
        if self.regression_threshold is not None:
            if not _is_real(self.regression_threshold) or not (0 < self.regression_threshold < math.inf):
                raise ValueError(
                    f"Patience: regression_threshold must be a finite number > 0 (0.1 is the published "
                    f"setting for STS-B), got {self.regression_threshold!r}"
                )
            object.__setattr__(self, "regression_threshold", float(self.regression_threshold))

    @property
    def is_regression(self) -> bool:
        return self.regression_threshold is not None

    def check_fits(self, num_layers, num_labels):
        if self.is_regression and num_labels != 1:
            raise ValueError(
                f"Patience: regression_threshold is for a regression head (num_labels == 1) but the model has "
                f"num_labels={num_labels}; drop regression_threshold to compare predicted classes"
            )
        if not self.is_regression and num_labels == 1:
            raise ValueError(
                "Patience: the model is a regression head (num_labels == 1); pass regression_threshold "
                "(0.1 is the published setting for STS-B)"
            )
        if self.patience >= num_layers:
            if num_layers == 1:
                allowed = "Patience compares a layer with the one before it and needs at least 2 layers"
            elif num_layers == 2:
                allowed = "use patience=1 (met at layer 2, the last: a 2-layer model cannot exit earlier with Patience)"
            else:
                allowed = (
                    f"use a patience in 1..{num_layers - 1} (patience={num_layers - 1} is met at the last layer "
                    f"only; {num_layers - 2} is the largest that can exit earlier)"
                )
            raise ValueError(
                f"Patience: patience={self.patience} can never be met on a {num_layers}-layer model (it is met at "
                f"layer patience + 1 at the earliest); {allowed}"
            )


@dataclass(frozen=True, repr=False)
class QExit(ExitPolicy):
    """PALBERT's deterministic Q-exit over PonderNet halting probabilities.

    Exit at the first layer whose cumulative halting probability exceeds ``q``. The
    halting head is PALBERT's Lambda layer: it reads the current and the previous pooled
    [CLS] vectors, ``combine``\\d as ``"concat"`` or ``"subtract"``, through
    ``lambda_layers`` blocks of ``Linear + tanh`` and a final ``Linear -> 1``.
    ``stochastic=True`` is PonderNet's original rule (exit with probability
    ``lambda_i``), drawn from a generator seeded with ``seed``.
    """

    q: float = 0.5
    combine: str = "concat"
    lambda_layers: int = 1
    stochastic: bool = False
    seed: int = 0
    needs_halting_head = True

    def __post_init__(self):
        if not _is_real(self.q) or not (0.0 < self.q < 1.0):
            raise ValueError(f"QExit: q must lie strictly between 0 and 1, got {self.q!r}")
        object.__setattr__(self, "q", float(self.q))
        if self.combine not in ("concat", "subtract"):
            raise ValueError(f"QExit: combine must be 'concat' or 'subtract', got {self.combine!r}")
        if (
            not isinstance(self.lambda_layers, numbers.Integral)
            or isinstance(self.lambda_layers, bool)
            or self.lambda_layers < 0
        ):
            raise ValueError(f"QExit: lambda_layers must be an integer >= 0, got {self.lambda_layers!r}")
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"QExit: stochastic must be True or False, got {self.stochastic!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"QExit: seed must be an integer, got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(
                f"QExit: seed must lie in -2**63..2**64 - 1 (what torch.Generator.manual_seed takes), got {self.seed!r}"
            )


@dataclass(frozen=True, repr=False)
class Voting(ExitPolicy):
    """Ensemble of internal classifiers: exit once one class has ``min_votes`` votes.

    Our reading of Sun et al. (2021), whose full text we did not have: each layer's head
    votes for its argmax; the prediction is the class with most votes, ties broken by
    the larger sum of probabilities. The returned logits are
    ``log(score / sum(score))`` with ``score = votes + prob_sum / (layer + 1)``, whose
    argmax is that prediction.
    """

    min_votes: int
    needs_distribution = True

    def __post_init__(self):
        if not isinstance(self.min_votes, numbers.Integral) or isinstance(self.min_votes, bool) or self.min_votes < 1:
            raise ValueError(f"Voting: min_votes must be an integer >= 1, got {self.min_votes!r}")
        object.__setattr__(self, "min_votes", int(self.min_votes))

    def check_fits(self, num_layers, num_labels):
        if num_labels < 2:
            raise ValueError(
                f"Voting needs a classification head (num_labels >= 2) to vote over classes but the model has "
                f"num_labels={num_labels}; for regression use Patience(patience, regression_threshold=0.1)"
            )
        if self.min_votes > num_layers:
            raise ValueError(
                f"Voting: min_votes={self.min_votes} exceeds the {num_layers} layers; use at most {num_layers}"
            )


@dataclass(frozen=True, repr=False)
class DACT(ExitPolicy):
    """Differentiable adaptive computation time (Eyzaguirre et al. 2021).

    A halting head gives ``h_i``; the accumulated distribution ``a_i`` and ``pi_i`` follow
    the spec's recursion; a sequence exits once the runner-up class can no longer
    overtake. The returned logits are ``ln a_exit``.
    """

    needs_halting_head = True
    needs_distribution = True

    def check_fits(self, num_layers, num_labels):
        if num_labels < 2:
            raise ValueError(
                f"DACT accumulates a class distribution and needs num_labels >= 2, but the model has "
                f"num_labels={num_labels}; for regression use Patience(patience, regression_threshold=0.1)"
            )


@dataclass(frozen=True, repr=False)
class SkipGates(ExitPolicy):
    """SmartBERT: skip layers whose gate says so, exit by entropy on the layers that run.

    Before layer ``i`` (``2 <= i <= L-1``) a gate reads the sequence's [CLS] state; if
    ``sigmoid(gate) >= skip_threshold`` the layer is skipped for that sequence (no
    classifier, no exit check there). On the layers that run, ``Entropy(entropy_threshold,
    normalized)`` decides.
    """

    skip_threshold: float = 0.5
    entropy_threshold: float | tuple[float, ...] = field(default=None)
    normalized: bool = False
    needs_skip_gates = True
    needs_distribution = True

    def __post_init__(self):
        if not _is_real(self.skip_threshold) or not (0.0 < self.skip_threshold <= 1.0):
            raise ValueError(f"SkipGates: skip_threshold must lie in (0, 1], got {self.skip_threshold!r}")
        object.__setattr__(self, "skip_threshold", float(self.skip_threshold))
        if self.entropy_threshold is None:
            raise ValueError("SkipGates: entropy_threshold is required, e.g. SkipGates(entropy_threshold=0.3)")
        object.__setattr__(
            self,
            "entropy_threshold",
            _per_layer_floats(
                "SkipGates", "entropy_threshold", self.entropy_threshold, low=0.0, high=1e9, low_open=False
            ),
        )
        if not isinstance(self.normalized, bool):
            raise ValueError(f"SkipGates: normalized must be True or False, got {self.normalized!r}")

    def check_fits(self, num_layers, num_labels):
        super().check_fits(num_layers, num_labels)
        _check_per_layer_length("SkipGates", "entropy_threshold", self.entropy_threshold, num_layers)


@dataclass(frozen=True, eq=False, repr=False)
class Scheduled(ExitPolicy):
    """Replay a given exit pattern: sequence ``b`` exits after layer ``exit_layers[b]``.

    ``exit_layers`` is an integer tensor ``[B]`` with values in ``1..L``; the batch it
    is used on must have exactly ``B`` sequences. For benchmarks and tests.
    """

    exit_layers: torch.Tensor

    def __post_init__(self):
        layers = self.exit_layers
        if not isinstance(layers, torch.Tensor):
            try:
                layers = torch.as_tensor(layers)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"Scheduled: exit_layers must be an integer tensor [B], got {type(layers)}") from err
        if layers.dtype.is_floating_point or layers.dtype.is_complex or layers.dtype == torch.bool:
            raise ValueError(f"Scheduled: exit_layers must be an integer tensor, got dtype {layers.dtype}")
        if layers.dim() != 1:
            raise ValueError(f"Scheduled: exit_layers must be 1-D [B], got shape {tuple(layers.shape)}")
        if layers.numel() and int(layers.min()) < 1:
            raise ValueError(f"Scheduled: exit_layers must be >= 1 (layers are 1-based), got {int(layers.min())}")
        object.__setattr__(self, "exit_layers", layers.to(torch.long))

    def check_fits(self, num_layers, num_labels):
        if self.exit_layers.numel() and int(self.exit_layers.max()) > num_layers:
            raise ValueError(
                f"Scheduled: exit_layers must lie in 1..{num_layers} (the model's layers), "
                f"got {int(self.exit_layers.max())}"
            )

    def check_batch(self, batch_size: int) -> None:
        if self.exit_layers.numel() != batch_size:
            raise ValueError(
                f"Scheduled: exit_layers has {self.exit_layers.numel()} entries but the batch has {batch_size} "
                f"sequences; give one exit layer per sequence"
            )


@dataclass(frozen=True, repr=False)
class MultiLabelConfidence(ExitPolicy):
    """Multi-label heads: exit when every label is decided with probability ``threshold``.

    With ``p_c = sigmoid(z_c)`` per label, a row exits when ``max(p_c, 1 - p_c) >= threshold``
    for every label ``c``, computed on the logits as ``|z_c| >= ln(threshold / (1 - threshold))``
    (float32; the same set in exact arithmetic, without the sigmoid's rounding). ``threshold``
    is one float or one per layer in [0.5, 1]: 0.5 exits at once, 1 never early. For models
    with ``config.problem_type == "multi_label_classification"`` only.
    """

    threshold: float | tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(
            self,
            "threshold",
            _per_layer_floats("MultiLabelConfidence", "threshold", self.threshold, low=0.5, high=1.0, low_open=False),
        )

    def check_fits(self, num_layers, num_labels):
        _check_per_layer_length("MultiLabelConfidence", "threshold", self.threshold, num_layers)

    def check_problem_type(self, problem_type):
        if problem_type != MULTI_LABEL:
            raise ValueError(
                f"MultiLabelConfidence is for multi-label models (config.problem_type={MULTI_LABEL!r}, one "
                f"sigmoid per label) but the model's problem_type is {problem_type!r}; for a single-label "
                f"classifier use eek.MaxProb or eek.Entropy, or set config.problem_type={MULTI_LABEL!r} if the "
                f"model was trained with a sigmoid per label"
            )

    def margin(self, layer: int) -> float:
        """``ln(t / (1 - t))`` for this layer's threshold ``t``: the smallest ``|z_c|`` that counts as decided."""
        t = layer_value(self.threshold, layer)
        return math.inf if t >= 1.0 else math.log(t / (1.0 - t))


@dataclass(frozen=True, repr=False)
class ScoreBand(ExitPolicy):
    """Single-output heads (cross-encoder rerankers, ``num_labels == 1``): exit when the score is settled.

    A row exits when its raw score (the logit) is ``<= low`` (confidently irrelevant) or
    ``>= high`` (confidently relevant); either bound may be None (never that side), not
    both. For a probability ``p`` after the sigmoid, pass ``ln(p / (1 - p))``. A row that
    leaves early reports its layer's score, as the other rules report their logits.
    """

    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"ScoreBand: {name} must be a finite number or None, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.low is None and self.high is None:
            raise ValueError("ScoreBand: give low (leave when the score is at most low), high, or both")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"ScoreBand: low must be below high, got low={self.low!r}, high={self.high!r}")

    def check_fits(self, num_layers, num_labels):
        if num_labels != 1:
            raise ValueError(
                f"ScoreBand reads one score per row (num_labels == 1, a cross-encoder or regression head) but the "
                f"model has num_labels={num_labels}; for classifiers use eek.MaxProb, eek.Entropy or, for "
                f"multi-label models, eek.MultiLabelConfidence"
            )
