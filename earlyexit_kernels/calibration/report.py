"""How a calibration's candidates are shown: the policies as code, the accuracy-vs-layers table and plot.

print_curve(result.curve); plot_curve(result.curve, "curve.png", full_accuracy=result.full_accuracy)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

from earlyexit_kernels.calibration.record import CurvePoint
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["describe", "distinct_digits", "print_curve", "compact_curve", "plot_curve"]


def describe(policy: ExitPolicy, digits: int | None = 4) -> str:
    """The code that builds ``policy``, floats rounded to ``digits`` significant digits (None: exact).

    ``Entropy(0.2131)``, ``Patience(2)``, ``QExit(q=0.41)``, ``SkipGates(entropy_threshold=0.3874)``:
    valid Python, as :meth:`ExitPolicy.to_code` writes it.
    """
    return policy.to_code(digits)


def distinct_digits(policies: Sequence[ExitPolicy], start: int = 4) -> int | None:
    """The fewest significant digits (at least ``start``) that print distinct policies distinctly.

    None when only the exact text does (17 digits are always enough for a float).
    """
    exact = len({repr(p) for p in policies})
    for digits in range(start, 18):
        if len({p.to_code(digits) for p in policies}) == exact:
            return digits
    return None


def print_curve(curve: Sequence[CurvePoint], file=None) -> None:
    """Print the accuracy-vs-layers table, cheapest first, with enough digits to tell the policies apart."""
    digits = distinct_digits([p.policy for p in curve])
    names = [describe(p.policy, digits) for p in curve]
    width = max([34, *(len(n) + 2 for n in names)])
    print(f"{'policy':<{width}}{'accuracy':>10}{'layers':>9}{'exit':>7}", file=file)
    for name, point in sorted(zip(names, curve), key=lambda item: (item[1].mean_layers, item[1].accuracy)):
        print(
            f"{name:<{width}}{100 * point.accuracy:>9.2f}%{point.mean_layers:>9.3f}{point.mean_exit_layer:>7.2f}",
            file=file,
        )


def compact_curve(curve: Sequence[CurvePoint], rows: int = 12, chosen: CurvePoint | None = None) -> list[CurvePoint]:
    """At most ``rows`` points of ``curve`` for printing: its Pareto front (no other point is both
    cheaper and more accurate), thinned evenly by mean layers, with its two ends and ``chosen`` kept."""
    ordered = sorted(curve, key=lambda p: (p.mean_layers, -p.accuracy))
    front, best = [], -math.inf
    for point in ordered:
        if point.accuracy > best:
            front.append(point)
            best = point.accuracy
    if len(front) > rows:
        picks = {round(i * (len(front) - 1) / (rows - 1)) for i in range(rows)}
        front = [p for i, p in enumerate(front) if i in picks]
    if chosen is not None and all(p is not chosen for p in front):
        front.append(chosen)
    return sorted(front, key=lambda p: (p.mean_layers, p.accuracy))


def plot_curve(
    curves,
    path: str,
    *,
    full_accuracy: float | None = None,
    baseline: Sequence[tuple[int, float]] | None = None,
    chosen: CurvePoint | None = None,
    title: str = "accuracy vs mean layers run",
) -> str | None:
    """Save accuracy against mean layers run as an image; returns ``path``, or None without matplotlib.

    ``curves``: one curve (a list of :class:`CurvePoint`) or a dict ``{label: curve}``.
    ``baseline``: the static cut-at-layer-k accuracies, drawn dashed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plot_curve: matplotlib is not installed (pip install matplotlib); no plot written", stacklevel=2)
        return None
    if not isinstance(curves, Mapping):
        curves = {"early exit": curves}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if baseline is not None:
        ax.plot([k for k, _ in baseline], [100 * a for _, a in baseline], "k--o", ms=3, label="static: cut at layer k")
    for label, curve in curves.items():
        points = sorted(curve, key=lambda p: p.mean_layers)
        ax.plot([p.mean_layers for p in points], [100 * p.accuracy for p in points], "-o", ms=3, label=label)
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="grey", lw=0.8, label="full model")
    if chosen is not None:
        ax.plot([chosen.mean_layers], [100 * chosen.accuracy], "r*", ms=12, label="chosen")
    ax.set_xlabel("mean layers run")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
