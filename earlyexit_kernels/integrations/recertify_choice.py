"""What a server is asked of re-certification, as one type: :class:`Recertify` (on where it can be, on, off), or
the :class:`~earlyexit_kernels.calibration.online.OnlineCertificate` to serve.

``eek serve --recertify/--no-recertify``, ``create_app(recertify=)`` and the Ray paths take None, True or False
(and a certificate); :meth:`Recertify.of` turns each into this type once, with the one refusal of anything else,
and :class:`~earlyexit_kernels.integrations.server.serve_settings.ServeSettings` holds it.
"""

from __future__ import annotations

import enum

__all__ = ["Recertify"]


class Recertify(enum.Enum):
    """Whether the served threshold moves along its certified path as the audited sequences certify it.

    ``AUTO`` (None, the default of every serving path): on where an audit runs on an ``eek fit`` folder whose
    certificate bounds disagreement with the full model, off otherwise, saying why; ``ON`` (True): on, or an error
    saying what is missing; ``OFF`` (False): off. Each member's ``value`` is what
    :func:`~earlyexit_kernels.integrations.online_certificate.resolve_online_certificate` takes."""

    AUTO = None
    ON = True
    OFF = False

    @classmethod
    def of(cls, value):
        """``value`` as a setting: a :class:`Recertify` as it is, None / True / False as the member of that value,
        an :class:`~earlyexit_kernels.calibration.online.OnlineCertificate` as it is (that one is served); else a
        ``ValueError`` saying what is taken."""
        from earlyexit_kernels.calibration.online import OnlineCertificate

        if isinstance(value, (cls, OnlineCertificate)):
            return value
        if value is None or value is True or value is False:
            return cls(value)
        raise ValueError(f"recertify must be an OnlineCertificate, None, True or False, got {value!r}")
