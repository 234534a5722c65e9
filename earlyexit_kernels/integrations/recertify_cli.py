"""The command line's re-certification options: ``--recertify/--no-recertify`` and ``--audit-record FILE``.

``eek serve`` and ``eek classify`` take them beside ``--audit-fraction``; what they decide is said
on stderr in one line (on, from which candidate, at which budget; or off, and why).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_recertify_options", "recertify_options"]


def add_recertify_options(command, what: str) -> None:
    command.add_argument(
        "--recertify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"move the served threshold along MODEL's certified path (eek_fit.json) as the audited {what} certify "
        "it, and back to full depth when they show it over the budget (an anytime-valid test; docs/serving.md). "
        "Default: on where --audit-fraction is above 0 and MODEL's certificate bounds disagreement with the full "
        "model (eek fit without labels); --no-recertify keeps the folder's threshold as it is",
    )
    command.add_argument(
        "--audit-record",
        default=None,
        metavar="FILE",
        help="with re-certification: write the audited rows since the last pull-back (every head's logits, no "
        "text) to FILE, for `eek calibrate MODEL --from-audit FILE` to write the served certificate back into "
        "the folder (default: not written)",
    )


def recertify_options(args, audit: dict, *, local: bool, multi_label: bool = False) -> dict:
    """``{"recertify": ..., "audit_record": ...}`` for the serving call, or a ``RecertifyError`` (one line).

    ``local``: the certificate itself (``OnlineCertificate`` or None), built here; else (Ray: each
    replica or actor builds its own) True / False."""
    from earlyexit_kernels.calibration.online import RecertifyError
    from earlyexit_kernels.integrations.model_folder import resolve_model
    from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate
    from earlyexit_kernels.methods.policy_spec import parse_policy

    if args.policy is not None and args.recertify:
        raise RecertifyError("--recertify moves the folder's certified threshold; leave --policy out to re-certify")
    requested = False if args.policy is not None else args.recertify
    try:
        certificate, why = resolve_online_certificate(
            str(resolve_model(args.model)),
            None if args.policy is None else parse_policy(args.policy),
            requested,
            fraction=audit.get("audit_fraction", 0.0),
            budget=audit.get("audit_budget"),
            confidence=audit.get("audit_confidence"),
            multi_label=multi_label,
        )
    except ValueError as error:
        raise RecertifyError(str(error)) from None
    if args.audit_record is not None and certificate is None:
        raise RecertifyError(f"--audit-record records what re-certification replays, and it is {why}")
    if audit.get("audit_fraction") or args.recertify is not None:
        print(f"re-certification: {why}", file=sys.stderr)
    if local:
        return {"recertify": certificate, "audit_record": args.audit_record}
    return {"recertify": certificate is not None, "audit_record": args.audit_record}
