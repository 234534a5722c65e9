"""One server's settings, made once and checked where they are made (``ValueError`` saying what a valid one is),
as vLLM's command line builds one config that every part reads.

:class:`ServeSettings` holds three groups and what the served threshold promises:

- ``engine``: the continuous engine's limits, an :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`
  (arrival order);
- ``http``: what a request may be and hold, :class:`HttpLimits`;
- ``audit``: the sequences also run through the full model and what they are watched against,
  :class:`~earlyexit_kernels.engine.entry.audit.AuditConfig` (the watch's own settings object, checked there), or None
  (no audit).

:meth:`ServeSettings.from_options` makes them from ``create_app``'s keyword options (each described
there); :meth:`ServeSettings.from_folder` from the same options and an ``eek fit`` folder, whose certificate
gives the audit's budget and confidence where none is given and what ``/info`` says is promised. ``eek
serve`` (with or without ``--calibration``) and each Ray replica call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from earlyexit_kernels.engine.entry.audit import AUDIT_OPTIONS, AuditConfig, audit_config
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.integrations.cli_options import HTTP_FIELDS
from earlyexit_kernels.integrations.recertify_choice import Recertify
from earlyexit_kernels.integrations.server.body_limit import DEFAULT_MAX_BODY_BYTES, check_max_body_bytes

if TYPE_CHECKING:
    from earlyexit_kernels.calibration.online import OnlineCertificate

__all__ = ["AuditConfig", "HttpLimits", "Recertify", "ServeSettings", "recertify_on_own_threshold"]

#: ``create_app``'s options that are the engine's limits (:class:`EngineConfig`'s fields)
ENGINE_OPTIONS = ("max_batch_size", "max_tokens", "max_length", "compile", "max_age", "call_cost", "engine")

#: a server's bounded waiting where none is given: strictly oldest first. Against ``"auto"`` (2 x the
#: layers, the engine's own default, which leaves the batching order room), alternating on one thread of
#: the AMD EPYC: more texts/s and a lower p99 at concurrency 8 on MiniLM-L6 int8 and float32 and MPNet-base
#: int8, more texts/s at 32 (docs/serving.md, "Bounded waiting")
SERVING_MAX_AGE = 0
#: ``create_app``'s options that are :class:`HttpLimits`' fields
HTTP_OPTIONS = ("max_queue", "max_client_batch_size", "max_body_bytes", "api_key")
#: ``create_app``'s other options: :class:`ServeSettings`' own fields
OWN_OPTIONS = ("model_id", "recertify", "audit_record", "certificate")


def recertify_on_own_threshold(recertify, *, own_threshold: bool):
    """``recertify`` (as :meth:`Recertify.of` takes it) as a :class:`Recertify` (or the certificate given) for a
    server whose threshold is the user's own where ``own_threshold`` (a policy given, or a certificate made at
    start-up): re-certification moves the folder's certified threshold along its path, so it is off there
    (``AUTO`` becomes ``OFF``) and asking for it (``ON``, True) is a ``ValueError``."""
    recertify = Recertify.of(recertify)
    if not own_threshold:
        return recertify
    if recertify is Recertify.ON:
        raise ValueError(
            "re-certification (--recertify) moves the folder's certified threshold; leave out the policy "
            "(--policy) and the start-up certificate (--calibration) to re-certify"
        )
    return Recertify.OFF if recertify is Recertify.AUTO else recertify


def _whole(name: str, value, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


@dataclass(frozen=True)
class HttpLimits:
    """What one request may be and hold.

    ``max_queue`` (>= 1): most sequences submitted and not finished; a request that does not fit gets 429 at
    once. ``max_client_batch_size`` (>= 1, default ``max_queue``): most inputs (or rerank texts) in one
    request; a bigger request gets 413 naming the limit, a smaller one is split over as many layer calls as
    the engine's ``max_batch_size`` needs. ``max_body_bytes`` (>= 1): the largest request body taken; a larger
    one gets 413 before it is read whole (:mod:`.body_limit`, TEI's default of 2,000,000 bytes). ``api_key``
    (a non-empty string or None): when given, every route but ``/health`` needs ``Authorization: Bearer
    <api_key>``.
    """

    max_queue: int = dataclasses.field(default=1024, metadata=HTTP_FIELDS["max_queue"])
    max_client_batch_size: int | None = dataclasses.field(default=None, metadata=HTTP_FIELDS["max_client_batch_size"])
    max_body_bytes: int = dataclasses.field(default=DEFAULT_MAX_BODY_BYTES, metadata=HTTP_FIELDS["max_body_bytes"])
    api_key: str | None = None

    def __post_init__(self):
        _whole("max_queue", self.max_queue, 1)
        if self.max_client_batch_size is None:
            object.__setattr__(self, "max_client_batch_size", self.max_queue)
        _whole("max_client_batch_size", self.max_client_batch_size, 1)
        check_max_body_bytes(self.max_body_bytes)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")


@dataclass(frozen=True)
class ServeSettings:
    """Every setting of one server (the module's docstring): ``engine``, ``http``, ``audit``, and

    ``model_id``: the served model's name. ``recertify``: whether the served threshold moves along its
    certified path as the audited sequences certify it (needs the audit; its moves at ``/metrics``,
    ``eek_policy_*``): an :class:`~earlyexit_kernels.calibration.online.OnlineCertificate` (that one), or a
    :class:`~earlyexit_kernels.integrations.recertify_choice.Recertify`: ``AUTO`` (the default: on where an audit
    runs on an ``eek fit`` folder, ``folder``, whose certificate bounds disagreement with the full model), ``ON``
    (on, or a ``ValueError`` saying what is missing), ``OFF``; None, True and False are taken for them and held
    as the member (:meth:`~earlyexit_kernels.integrations.recertify_choice.Recertify.of`).
    :class:`~.serving_state.ServingState` builds it from ``folder`` and the model it serves
    (:func:`~earlyexit_kernels.integrations.online_certificate.resolve_online_certificate`). ``audit_record``: a
    file the audited rows of its epoch are written to, for ``eek calibrate FOLDER --from-audit`` (needs
    re-certification on). ``certificate``: the fields of the served threshold's certificate
    (``eek_fit.json``'s, or ``--calibration``'s), what ``/info`` says it promises. ``folder``: the ``eek fit``
    folder the model was loaded from (:meth:`from_folder` sets it), or None.
    """

    engine: EngineConfig = EngineConfig(max_age=SERVING_MAX_AGE)
    http: HttpLimits = HttpLimits()
    audit: AuditConfig | None = None
    model_id: str = "model"
    recertify: Recertify | OnlineCertificate = Recertify.AUTO
    audit_record: str | None = None
    certificate: dict | None = None
    folder: str | None = None

    def __post_init__(self):
        if not isinstance(self.engine, EngineConfig) or self.engine.admission != "fifo":
            raise ValueError("a server's engine is an EngineConfig admitting in arrival order (admission='fifo')")
        if self.audit is not None and self.audit.fraction == 0:
            raise ValueError("an audit needs a fraction above 0; no audit is audit=None (audit_fraction=0)")
        object.__setattr__(self, "recertify", Recertify.of(self.recertify))
        if self.recertify not in (Recertify.AUTO, Recertify.OFF) and self.audit is None:
            raise ValueError("re-certification reads the audit: give an audit fraction above 0 (--audit-fraction 0.05)")
        off = self.recertify is Recertify.OFF or (self.recertify is Recertify.AUTO and self.folder is None)
        if self.audit_record is not None and off:
            raise ValueError("the audit record holds what re-certification replays: it needs re-certification on")

    @classmethod
    def from_options(cls, **options) -> ServeSettings:
        """The settings of ``create_app``'s keyword ``options`` (``max_batch_size=``, ``audit_fraction=``,
        ...); a ``TypeError`` names one that is none."""
        known = (*ENGINE_OPTIONS, *HTTP_OPTIONS, *AUDIT_OPTIONS, *OWN_OPTIONS)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown server option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
        engine_given = {name: options[name] for name in ENGINE_OPTIONS if name in options}
        engine = EngineConfig(admission="fifo", **{"max_age": SERVING_MAX_AGE, **engine_given})
        http = HttpLimits(**{name: options[name] for name in HTTP_OPTIONS if name in options})
        # None: not given (the command line passes what it was not given so), each field's default
        audit = audit_config(options)
        return cls(engine, http, audit, **{name: options[name] for name in OWN_OPTIONS if name in options})

    @classmethod
    def from_folder(cls, folder: str, *, policy=None, certificate="saved", where=None, **options) -> ServeSettings:
        """The settings of a server of the ``eek fit`` folder ``folder``, read from it once (``options``: as
        :meth:`from_options`):

        - the audit's budget and confidence not given: its certificate's
          (:func:`~earlyexit_kernels.integrations.model_folder.audit_settings`, which says why where it gives
          none), ``audit.source`` saying where they came from;
        - the accuracy lost labelled audited inputs are watched against, where not given: the certificate's
          budget where it is on accuracy lost;
        - what ``/info`` says the served threshold promises: the certificate, none with ``policy`` (a
          threshold of the user's own) unless one is given.

        ``certificate`` (with ``where``, what made it): one made at start-up in place of the saved one
        (``eek serve --calibration``). Re-certification moves the folder's threshold along its certified path:
        with ``policy`` or a ``certificate`` made at start-up it is off, and asking for it is a ``ValueError``."""
        from earlyexit_kernels.integrations.model_folder import (
            SAVED,
            accuracy_audit_budget,
            audit_settings,
            fit_certificate,
        )

        own = policy is not None or certificate != SAVED
        options["recertify"] = recertify_on_own_threshold(options.get("recertify"), own_threshold=own)
        # every option checked before the folder is read; the record with the folder, which decides re-certification
        record = options.pop("audit_record", None)
        settings = cls.from_options(**options)
        changes = {"folder": str(folder), "audit_record": record}
        if settings.audit is not None:
            given = {} if certificate == SAVED else {"certificate": certificate, "where": where}
            budget, confidence, source = audit_settings(
                folder, options.get("audit_budget"), options.get("audit_confidence"), **given
            )
            accuracy = options.get("audit_accuracy_budget")
            if accuracy is None:
                accuracy = accuracy_audit_budget(
                    folder, **({} if certificate == SAVED else {"certificate": certificate})
                )
            changes["audit"] = dataclasses.replace(
                settings.audit, budget=budget, confidence=confidence, accuracy_budget=accuracy, source=source
            )
        if "certificate" not in options:
            if certificate != SAVED:
                changes["certificate"] = certificate
            elif policy is None:
                changes["certificate"] = fit_certificate(folder)
        return dataclasses.replace(settings, **changes)
