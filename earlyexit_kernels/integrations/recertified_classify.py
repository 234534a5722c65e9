"""``eek.classify`` as users call it: :func:`earlyexit_kernels.engine.classify.classify`, with ``recertify``'s
default resolved from the model's ``eek fit`` folder.

The engine's own ``classify`` sits below the layer that reads model folders; this one finds the
folder the model was loaded from (``model.name_or_path``) and turns ``recertify=None`` (on where an
audit runs on a folder certified on disagreement) or ``True`` into its
:class:`~earlyexit_kernels.training.online_certificate.OnlineCertificate`
(:func:`~earlyexit_kernels.integrations.recertify_folder.resolve_online_certificate`).
"""

from __future__ import annotations

import functools

from earlyexit_kernels.engine import classify as engine_classify

__all__ = ["classify"]


@functools.wraps(engine_classify.classify)
def classify(model, inputs, *, recertify=None, audit=None, audit_fraction: float = 0.0, **options):
    from earlyexit_kernels.engine.audit import AuditWatch, check_fraction, is_multi_label
    from earlyexit_kernels.patching.patch import is_patched, policy_of

    fraction = audit.fraction if isinstance(audit, AuditWatch) else check_fraction(audit_fraction)
    if recertify is None and not fraction > 0 or not is_patched(model):
        recertify = False  # nothing to re-certify on; the engine says what is wrong with the model
    if recertify is None or recertify is True:
        from earlyexit_kernels.integrations.recertify_folder import resolve_online_certificate

        recertify, _ = resolve_online_certificate(
            getattr(model, "name_or_path", None) or None,
            policy_of(model),
            recertify,
            fraction=fraction,
            budget=getattr(audit, "budget", None),
            confidence=None if getattr(audit, "budget", None) is None else audit.confidence,
            multi_label=is_multi_label(model.config),
        )
    return engine_classify.classify(
        model, inputs, recertify=recertify or False, audit=audit, audit_fraction=audit_fraction, **options
    )
