"""An ``eek fit`` folder's online certificate: its certified path, its policy, its certificate's budget.

:func:`certificate_of_folder` builds the
:class:`~earlyexit_kernels.calibration.online.OnlineCertificate` of a folder;
:func:`resolve_online_certificate` decides whether a serving path re-certifies (the default of
``eek serve``, ``eek classify``, ``eek.classify`` (:mod:`.classify`), Ray Serve and Ray Data) and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

from earlyexit_kernels.calibration.online import OnlineCertificate, RecertifyError

__all__ = ["certificate_of_folder", "resolve_online_certificate"]


def certificate_of_folder(folder: str, served=None, **options) -> OnlineCertificate:
    """The online certificate of an ``eek fit`` folder: its saved path (else its family's fixed grid),
    its certified policy as the start (``served``: the policy served instead, which must be on the path),
    its certificate's budget and confidence (``options`` override)."""
    from earlyexit_kernels.calibration.candidates import certified_candidates
    from earlyexit_kernels.integrations.model_folder import fit_certificate
    from earlyexit_kernels.integrations.recertify_folder import saved_path
    from earlyexit_kernels.patching.exit_files import CONFIG_FILE, policy_from_dict

    certificate = fit_certificate(folder)
    if certificate is None:
        raise RecertifyError(
            f"{folder} has no certificate in eek_fit.json, so no certified path to re-certify along: fit it with "
            "`eek fit` (its default certifies), or serve without re-certification (--no-recertify)"
        )
    try:
        policy = policy_from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text())["policy"])
        model_config = json.loads((Path(folder) / "config.json").read_text())
        num_layers = int(model_config["num_hidden_layers"])
        num_labels = len(model_config.get("id2label") or {}) or int(model_config.get("num_labels", 2))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RecertifyError(f"{folder}: cannot read the served policy from {CONFIG_FILE} ({error})") from None
    path = saved_path(folder) or certified_candidates(policy, num_layers, num_labels)
    if served is not None and served not in path:
        raise RecertifyError(f"the model serves {served.to_code(4)}, which is not on the folder's certified path")
    start = next((i for i, candidate in enumerate(path) if candidate == (served or policy)), 0)
    # the audit's risk is the answers changed: where the folder also certified a smaller budget on them
    # (``changed_budget``, beside accuracy lost), that one bounds what the audit may loosen to
    budgets = [float(certificate["budget"]), certificate.get("changed_budget")]
    options.setdefault("budget", min(float(b) for b in budgets if b is not None))
    options.setdefault("confidence", float(certificate["confidence"]))
    return OnlineCertificate(path, start=start, **options)


def resolve_online_certificate(
    folder: str | None,
    served_policy,
    recertify: bool | None,
    *,
    fraction: float,
    budget: float | None = None,
    confidence: float | None = None,
    multi_label: bool = False,
) -> tuple[OnlineCertificate | None, str]:
    """Whether the served policy is re-certified online, and the reason: ``(certificate or None, why)``.

    ``recertify`` None (the default of every serving path): on where an audit runs (``fraction`` > 0)
    on an ``eek fit`` folder whose certificate bounds disagreement with the full model (what the audit
    measures) and which serves its own certified policy; off otherwise, said in ``why``. True: on, or a
    :class:`RecertifyError` saying what is missing; False: off. ``budget`` / ``confidence``: the audit's,
    else the folder certificate's."""
    if recertify is False:
        return None, "off (--no-recertify)"
    explicit = recertify is True

    def off(reason: str):
        if explicit:
            raise RecertifyError(f"cannot re-certify online: {reason}")
        return None, f"off: {reason}"

    if not fraction > 0:
        return off("no audit runs (give an audit fraction above 0: --audit-fraction 0.05)")
    if folder is None:
        return off("the model was not loaded from an eek fit folder, so it has no certified path")
    from earlyexit_kernels.calibration.certify import guarantee_of
    from earlyexit_kernels.integrations.model_folder import fit_certificate

    saved = fit_certificate(folder)
    if saved is None:
        return off(f"{folder} has no certificate in eek_fit.json (fit it with eek fit, whose default certifies)")
    if guarantee_of(saved) == "expected":
        return off(
            "its certificate holds in expectation (--guarantee expected) and online re-certification certifies with "
            "a probability, which would change what the folder promises; re-certify on the audited rows offline "
            "instead, which keeps it: eek serve --audit-record FILE, then eek calibrate FOLDER --from-audit FILE"
        )
    if _against_the_saved_model(folder) and saved.get("target") != "accuracy":
        return off(
            "its certificate on another base bounds the disagreement with the saved full model, which the audit "
            "(the served base's own full depth) does not measure; re-certify offline instead: eek calibrate FOLDER "
            "FILE --dtype D"
        )
    if saved.get("target") == "accuracy" and not explicit:
        return off(
            "its certificate bounds the accuracy lost (labelled rows) and the audit measures disagreement, a "
            "stricter risk that would move it deeper; --recertify certifies disagreement anyway"
        )
    options = {"fraction": fraction, "multi_label": multi_label}
    if budget is not None:
        options["budget"] = budget
    if confidence is not None:
        options["confidence"] = confidence
    try:
        certificate = certificate_of_folder(folder, served_policy, **options)
    except RecertifyError as error:
        return off(str(error))
    return certificate, (
        f"on: from {certificate.served_policy.to_code(4)} (candidate {certificate.start} of {len(certificate.path)}), "
        f"disagreement <= {100 * certificate.budget:g}% at {100 * certificate.confidence:g}%"
    )


def _against_the_saved_model(folder: str) -> bool:
    """Whether ``folder``'s threshold was last certified on another base against the saved full model (``eek
    calibrate --dtype D``'s default risk, ``"reference"``), as its ``eek_fit.json`` records."""
    from earlyexit_kernels.patching.fit_record import FitRecord

    record = FitRecord.read(folder)
    return record is not None and record.base_risk == "reference"  # recorded only where the base changed
