"""``eek.classify`` as users call it: the engine's (:func:`earlyexit_kernels.engine.entry.classify.classify`, which
takes a certificate by its type and reads no folder), with ``recertify``'s default resolved from the folder the
model was loaded from (``model.name_or_path``, :func:`.recertify_folder.resolve_online_certificate`): ``recertify``
is taken as :class:`.recertify_choice.Recertify` takes it (None, True, False or an ``OnlineCertificate``).
"""

from __future__ import annotations

import functools

from earlyexit_kernels.engine.entry import classify as engine_classify
from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate
from earlyexit_kernels.integrations.recertify_choice import Recertify

__all__ = ["classify"]


@functools.wraps(engine_classify.classify)
def classify(model, inputs, *, recertify=None, audit=None, audit_fraction: float = 0.0, **options):
    from earlyexit_kernels.engine.entry.audit import AuditWatch, is_multi_label
    from earlyexit_kernels.methods.risk_control import check_fraction
    from earlyexit_kernels.patching.patch import is_patched, policy_of

    fraction = audit.fraction if isinstance(audit, AuditWatch) else check_fraction(audit_fraction)
    recertify = Recertify.of(recertify)  # None, True, False or a certificate, refused here if none of them
    if recertify is Recertify.AUTO and not fraction > 0 or not is_patched(model):
        recertify = Recertify.OFF  # nothing to re-certify on; the engine says what is wrong with the model
    if recertify in (Recertify.AUTO, Recertify.ON):
        recertify, _ = resolve_online_certificate(
            getattr(model, "name_or_path", None) or None,
            policy_of(model),
            recertify.value,
            fraction=fraction,
            budget=getattr(audit, "budget", None),
            confidence=None if getattr(audit, "budget", None) is None else audit.confidence,
            multi_label=is_multi_label(model.config),
        )
    certificate = None if isinstance(recertify, Recertify) else recertify  # the engine takes the certificate or False
    return engine_classify.classify(
        model, inputs, recertify=certificate or False, audit=audit, audit_fraction=audit_fraction, **options
    )
