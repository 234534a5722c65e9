"""``eek serve MODEL --calibration FILE``: the served threshold certified at start-up, on the base it is served on.

A folder's certificate holds for the base it was made on (``eek fit``: the saved float32 model).
``--dtype int8`` (or bfloat16) runs layers that compute other values, so the saved threshold is
served uncertified there. Given rows, the server certifies its threshold on them before it takes a
request, as ``eek calibrate FOLDER FILE --dtype int8`` would, along the folder's certified path and
against its budget; the folder on disk is left as it is (``eek calibrate`` on a copy keeps the
result). The audit, where one runs, then watches this certificate instead of the folder's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServedCertificate", "certify_served"]


@dataclass
class ServedCertificate:
    """What :func:`certify_served` certified: the report (for its lines), the policy's exact code (what
    replicas load) and the certificate in ``eek_fit.json``'s shape (what the audit reads)."""

    report: object  # training.calibrate_texts.CalibrationReport
    policy_code: str
    certificate: dict | None

    def lines(self, source: str, base: str) -> list[str]:
        lines = [f"certified at start-up on {source}, on the {base} base served:"]
        lines += [f"  {line}" for line in self.report.summary()]
        refused = self.report.saving_refused()
        if refused is not None:
            lines.append(f"  no saving certified here ({refused}): the server runs {self.report.policy}")
        lines.append(
            "  the folder on disk is unchanged; to keep this certificate, run eek calibrate on a copy of it with the "
            "same rows and --dtype"
        )
        return lines


def certify_served(
    model,
    tokenizer,
    folder: str,
    data,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    base: str | None = None,
    guarantee: str | None = None,
    reference=None,
) -> ServedCertificate:
    """Certify ``model``'s threshold (already on the base it is served on) on ``data``
    (:class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`) with the budget and along the
    path of ``folder``'s certificate (1 point at 0.95 and the family's grid where it has none); the
    model ends patched with the certified policy, as :func:`~earlyexit_kernels.training.calibrate_texts.calibrate_texts`
    leaves it. Too few rows for the budget raise its ``FitError``, saying how many would do. ``base``: the
    base served (``--dtype``). On another than float32, with ``reference`` (the folder's model on its
    saved base) the risk is measured against its full depth, as ``eek calibrate --dtype`` certifies by default:
    accuracy lost where ``data`` has labels, else disagreement; without ``reference``, disagreement with the
    served base's full depth, labelled rows or not
    (:class:`~earlyexit_kernels.training.calibrate_texts.BaseChange`). ``guarantee``: ``"probable"`` or
    ``"expected"`` (None: the folder's own)."""
    from earlyexit_kernels.integrations.recertify_folder import (
        saved_budget,
        saved_changed,
        saved_guarantee,
        saved_path,
    )
    from earlyexit_kernels.patching.patch import policy_of
    from earlyexit_kernels.training.calibrate_texts import base_change_for, calibrate_texts, calibration_goal
    from earlyexit_kernels.training.fit_texts import CONFIDENCE

    max_drop, confidence = saved_budget(folder)
    max_drop = 1.0 if max_drop is None else max_drop
    max_changed = saved_changed(folder)  # beside accuracy lost where the rows have labels and the risk reads them
    if max_changed is not None and (data.labels is None or (base not in (None, "float32") and reference is None)):
        max_drop, max_changed = min(max_drop, max_changed), None  # the risk is the answers changed: the smaller
    goal = calibration_goal(
        max_drop,
        CONFIDENCE if confidence is None else confidence,
        saved_guarantee(folder) if guarantee is None else guarantee,
        max_changed,
    )
    report = calibrate_texts(
        model,
        tokenizer,
        data,
        goal,
        batch_size=batch_size,
        max_length=max_length,
        path=saved_path(folder),
        base_change=base_change_for(base, reference, "auto" if reference is not None else "agreement"),
    )
    certificate = None
    if report.certificate is not None:
        certificate = {**report.certificate, "target": report.target}
    return ServedCertificate(report, policy_of(model).to_code(), certificate)
