"""What a certificate says: the guarantees and risks in words, and :class:`Certificate`, the fields
:func:`~earlyexit_kernels.calibration.certify.certify` fills (saved as they are in ``eek_fit.json``) and the
paragraph that describes them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "GUARANTEES",
    "RISKS",
    "Certificate",
    "check_guarantee",
    "describe_certificate",
    "guarantee_of",
    "share_confidence",
]

#: what each guarantee promises, in the certificate's words
GUARANTEES = {
    "probable": "with probability at least the confidence over the draw of the calibration rows, the risk of what is "
    "served is within the budget (Learn-then-Test: each candidate's exact test, walked in order)",
    "expected": "over the draw of the calibration rows, the risk of what is served is within the budget on average "
    "(conformal risk control: the walk stops at the first candidate whose (n x observed + 1) / (n + 1) passes the "
    "budget); any one draw may serve above it. A theorem where the loss rises with "
    "the threshold (disagreement), measured for paired accuracy lost",
}

#: what each risk counts, per row
RISKS = {
    "agreement": "rows whose early exit predicts another class than the full model",
    "accuracy": "accuracy lost against the full model",
}
MULTI_LABEL_RISKS = {
    "agreement": "labels decided otherwise than by the full model (fraction per row)",
    "accuracy": "per-label accuracy lost against the full model",
}


@dataclass
class Certificate:
    """What certified calibration found, on ``rows`` calibration rows.

    ``budget`` and ``confidence``: as asked (the budget a fraction); ``risk``: what is counted;
    ``observed``: the chosen policy's risk on the calibration rows; ``bound``: its upper
    ``confidence`` bound (at most ``budget`` when ``certified``); ``certified``: some early
    exit is certified (False: the chosen policy never exits early); ``tested``: candidates
    tested; ``uncertified_layers``: the mean layers of the point an uncertified calibration
    picks on the same rows (None when not computed), so ``mean_layers - uncertified_layers``
    is what the guarantee costs; ``rows_needed``: when nothing is certified, the rows at
    which the cheapest promising candidate would be (None: no candidate's observed risk is
    under the budget); ``needed_for``: that candidate; ``path``: the ordered candidates
    walked (:mod:`~earlyexit_kernels.calibration.candidates`: ``"global"``, ``"per_layer"``,
    or ``"saved"``: a folder's own), ``path_layers``: what each path needed on the path rows;
    ``more_rows`` / ``more_rows_layers``: when certified, about how many rows like these would
    certify a cheaper candidate of the path, and its mean layers (the cheapest whose observed
    risk is at most half the budget; None where none is cheaper than the certified one).
    ``test``: the test each candidate took (``"exact binomial"``, ``"exact paired"``, ``"betting"``,
    ``"hoeffding-bentkus"``); ``order_seed``: the seed, drawn from the operating system's entropy, of the
    order the calibration rows were read in (what a test that reads rows in order, betting, saw;
    :func:`certify` with it reproduces the certificate). ``guarantee``: what the certificate promises
    (:data:`GUARANTEES`); ``other_layers``: the mean layers the other guarantee would serve on the same rows.
    ``changed_budget``, ``changed_observed``, ``changed_bound``: with ``certify(..., max_changed=)``, the budget on the
    answers changed against the full model, their share on the calibration rows and its bound (None without one).
    ``chosen_among``: ``eek fit --tries``' count of fits this one was kept from, each certified at a Bonferroni share
    ``1 - (1 - confidence) / chosen_among`` (which ``bound`` is at), so that the kept one holds at ``confidence``
    (:mod:`~earlyexit_kernels.training.fit_tries`; None: no choice).
    """

    budget: float
    confidence: float
    risk: str
    rows: int
    observed: float
    bound: float
    certified: bool
    tested: int
    mean_layers: float
    num_layers: int
    uncertified_layers: float | None = None
    rows_needed: int | None = None
    needed_for: str | None = None
    needed_rate: float | None = None
    unit: str = "rows"
    path: str = "global"
    path_layers: dict | None = None
    more_rows: int | None = None
    more_rows_layers: float | None = None
    unlabelled_rows: int | None = None
    unlabelled_use: str | None = None
    predicted_part: float | None = None
    error_part: float | None = None
    labelled_bound: float | None = None
    order_seed: int | None = None
    test: str | None = None
    guarantee: str = "probable"
    other_layers: float | None = None
    changed_budget: float | None = None
    changed_observed: float | None = None
    changed_bound: float | None = None
    chosen_among: int | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One paragraph: the budget, the confidence, the rows, the bound reached and its price."""
        if self.guarantee == "expected":
            head = (
                f"certified: {self.risk} <= {100 * self.budget:g}% in expectation over the draw of the calibration "
                f"{self.unit} (conformal risk control; a single draw may serve above it) on {self.rows} calibration "
                f"{self.unit}"
            )
        else:
            head = (
                f"certified: {self.risk} <= {100 * self.budget:g}% with confidence {100 * self.confidence:g}% "
                f"(exchangeable {self.unit}) on {self.rows} calibration {self.unit}"
            )
            if self.chosen_among is not None:
                share = share_confidence(self.confidence, self.chosen_among)
                head += f", kept among {self.chosen_among} tries each bounded at {100 * share:.4g}%"
        if self.changed_budget is not None:
            head += f" (and answers changed against the full model <= {100 * self.changed_budget:g}%)"
        if not self.certified:
            if self.rows_needed is None:
                return (
                    f"{head}: no early exit certified; every candidate that exits early shows a risk at or over "
                    f"the budget on these {self.unit}: train better heads or allow a larger budget"
                )
            return (
                f"{head}: no early exit certified; {self.needed_for} would be with about {self.rows_needed} {self.unit} "
                f"(its observed risk {100 * self.needed_rate:.2f}%), so the model runs all {self.num_layers} layers"
            )
        price = ""
        if self.uncertified_layers is not None:
            price = f"; the uncertified point runs {self.uncertified_layers:.2f} (the guarantee costs " + (
                f"{self.mean_layers - self.uncertified_layers:+.2f} layers)"
            )
        if self.more_rows is not None:
            price += (
                f"; about {self.more_rows} {self.unit} like these would certify {self.more_rows_layers:.2f} mean layers"
            )
        path = ""
        if self.path != "global":
            path = f", along the {self.path.replace('_', '-')} path"
        bound = "adjusted risk" if self.guarantee == "expected" else "bound"
        return (
            f"{head}{path}: observed {100 * self.observed:.2f}%, {bound} {100 * self.bound:.2f}%, "
            f"{self.mean_layers:.2f} of {self.num_layers} mean layers{self._changed()}{price}{self._unlabelled()}"
            f"{self._other()}"
        )

    def _changed(self) -> str:
        """The second budget, on the answers changed, where one was asked for."""
        if self.changed_budget is None:
            return ""
        bound = "adjusted" if self.guarantee == "expected" else "bound"
        return (
            f"; answers changed: observed {100 * self.changed_observed:.2f}%, {bound} {100 * self.changed_bound:.2f}%"
        )

    def _other(self) -> str:
        """The other guarantee's price, where it serves fewer layers by a tenth of one or more."""
        if self.other_layers is None or self.other_layers > self.mean_layers - 0.1:
            return ""
        other = "expected" if self.guarantee == "probable" else "probable"
        return f"; --guarantee {other} would serve {self.other_layers:.2f} ({GUARANTEES[other].split(' (')[0]})"

    def _unlabelled(self) -> str:
        """What the unlabelled rows contributed, where there were any."""
        if self.unlabelled_rows is None:
            return ""
        if self.unlabelled_use == "powered":
            return (
                f"; with {self.unlabelled_rows} unlabelled rows (prediction-powered): the loss the full model's "
                f"probabilities predict, bounded on all {self.rows + self.unlabelled_rows} rows, "
                f"{100 * self.predicted_part:.2f}%, plus the prediction's error on the {self.rows} labelled rows, "
                f"{100 * self.error_part:.2f}%; the labelled rows alone bound it at {100 * self.labelled_bound:.2f}%"
            )
        return f"; the {self.unlabelled_rows} unlabelled rows were not used: {self.unlabelled_use}"


def share_confidence(confidence: float, among: int) -> float:
    """The confidence each of ``among`` certificates is made at, so that any one chosen among them by what they
    certified holds at ``confidence``: ``1 - (1 - confidence) / among`` (Bonferroni; ``confidence`` itself for one).
    ``eek fit --tries`` certifies each try at it (:mod:`~earlyexit_kernels.training.fit_tries`)."""
    return 1.0 - (1.0 - confidence) / among


def guarantee_of(fields: dict) -> str:
    """The guarantee of a certificate saved as its fields: ``"probable"`` where they say none (certified before
    there was a choice)."""
    return str(fields.get("guarantee") or "probable")


def check_guarantee(guarantee: str) -> str:
    """``guarantee`` if it is one of :data:`GUARANTEES`, else a ``ValueError`` naming them."""
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEES)}, got {guarantee!r}")
    return guarantee


def describe_certificate(fields: dict) -> str:
    """:meth:`Certificate.describe` of a certificate saved as its fields (:meth:`Certificate.as_dict`, e.g. in
    ``eek_fit.json``)."""
    return Certificate(**fields).describe()
