"""``eek fit --tries N``: the fit run N times, each try certified at a Bonferroni share of the confidence, and the try
that certifies the fewest layers kept.

Why: the fit's seed draws the validation split, the rows kept out to certify on, the heads' first weights and their
order, and on MiniLM-L6 Rotten Tomatoes it alone moved the certified layers by 0.9 of 6 on the same calibration rows
(docs/benchmarks.md, issue 108's section). A choice among seeds can take that spread back without breaking the
certificate:

- each try fixes its path of candidates on its own training and validation rows, before it reads its calibration
  rows, and certifies along it at confidence ``1 - (1 - confidence) / N`` (``try_confidence``:
  :func:`~earlyexit_kernels.calibration.certificate.share_confidence`);
- so the chance that any try's certified policy is over the budget is at most ``1 - confidence`` (Bonferroni: a
  union bound, which needs no independence between the tries, as Learn then Test takes it over its families);
- so whichever certified try is kept (:func:`kept_try`: the fewest mean layers) holds at ``confidence``.

The rule is for the ``probable`` guarantee only: the ``expected`` one bounds a mean over the draw, and the try of the
fewest layers is the one whose draw looked best, which a mean does not cover. Each try's calibration rows need only
be unseen by that try's training (the union bound holds whatever the tries share), so the rows kept out of the
training file may differ from try to try. The functions here are stateless: ``fit_folder`` runs the tries
(:func:`~earlyexit_kernels.integrations.fit_folder.fit_folder`), and the re-draw test
(``python_tests/test_fit_tries.py``) runs the same two functions on drawn rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from earlyexit_kernels.calibration.certificate import share_confidence as try_confidence

__all__ = ["MAX_TRIES", "describe_try", "describe_tries", "kept_try", "try_config", "try_confidence", "try_summary"]

#: the most tries ``--tries`` takes: each costs one fit's time, and each halving of the share a try is certified at
#: costs it layers (0.02-0.30 of 6 at three tries on MiniLM-L6 RT)
MAX_TRIES = 8


def try_config(config, index: int):
    """The :class:`~earlyexit_kernels.training.fit_config.FitConfig` of try ``index`` (from 0) of ``config``: seed
    ``config.seed + index``, certified at ``try_confidence`` (the calibration's
    :func:`~earlyexit_kernels.calibration.certificate.share_confidence`), one try."""
    return dataclasses.replace(
        config, seed=config.seed + index, confidence=try_confidence(config.confidence, config.tries), tries=1
    )


def try_summary(report, seed: int) -> dict:
    """What a try's :class:`~earlyexit_kernels.training.fit_texts.FitReport` says about the choice (saved in
    ``eek_fit.json``'s ``tries``): its seed, the confidence it was certified at, whether an early exit was
    certified, its mean layers on its calibration rows, and what the same rows certified uncertified."""
    certificate = report.certificate or {}
    return {
        "seed": seed,
        "confidence": report.confidence,
        "certified": bool(certificate.get("certified")),
        "mean_layers": report.mean_layers,
        "uncertified_layers": certificate.get("uncertified_layers"),
        "calibration_rows": report.calibration_rows,
    }


def kept_try(tries: Sequence[dict]) -> int:
    """The index of the try to keep among ``tries`` (:func:`try_summary`'s): of those that certified an early exit,
    the fewest mean layers (the first on a tie); where none did, the first (every try runs the full depth)."""
    certified = [index for index, entry in enumerate(tries) if entry["certified"]]
    if not certified:
        return 0
    return min(certified, key=lambda index: (tries[index]["mean_layers"], index))


def describe_try(entry: dict) -> str:
    """One try in words (:func:`try_summary`'s entry), as ``eek fit`` says it when the try ends."""
    layers = f"{entry['mean_layers']:.2f} mean layers" if entry["certified"] else "no early exit"
    return f"seed {entry['seed']} certified {layers} at {100 * entry['confidence']:.4g}%"


def describe_tries(tries: Sequence[dict], kept: int, confidence: float, num_layers: int) -> str:
    """The line ``eek fit`` prints about the tries: each one's certified layers, the one kept and why it holds."""
    each = ", ".join(
        f"seed {entry['seed']} " + (f"{entry['mean_layers']:.2f}" if entry["certified"] else "none certified")
        for entry in tries
    )
    head = f"tries (mean layers of {num_layers}, each certified at {100 * tries[kept]['confidence']:.4g}%): {each}"
    if not any(entry["certified"] for entry in tries):
        return f"{head}; no try certified an early exit, so the first is kept"
    return (
        f"{head}; kept seed {tries[kept]['seed']}, the fewest: it holds at {100 * confidence:g}% (the chance that "
        f"any try's certificate fails is at most {100 * (1 - confidence):g}%)"
    )
