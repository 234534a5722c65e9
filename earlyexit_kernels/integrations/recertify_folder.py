"""``eek calibrate FOLDER FILE``: a fitted model folder's threshold certified anew on FILE's rows, written back.

The threshold moves along the path ``eek fit`` certified along (``certified_path`` in
``eek_fit.json``: the ordered candidates, fixed before any of FILE's rows is read), else along
the policy family's fixed grid. The folder keeps its weights, heads, tokenizer and any other file; its policy (in
``early_exit_config.json``) and ``eek_fit.json`` (the threshold, the certificate, and a ``recalibrations`` list
of what each re-certification changed) are rewritten, so that a restart of ``eek serve`` and
its audit watch use the new certificate. The new folder is written beside the old one and
renamed into place: an interrupted run leaves the old folder whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from earlyexit_kernels._fit_fields import fit_field
from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.patching.exit_files import CONFIG_FILE, policy_to_dict
from earlyexit_kernels.patching.fit_record import SAVED, FitRecord
from earlyexit_kernels.patching.patch import policy_of

__all__ = ["Recalibration", "calibrate_folder", "saved_budget", "saved_changed", "saved_path"]


def saved_budget(path: str) -> tuple[float | None, float | None]:
    """``(max_drop in points, confidence)`` of the certificate in ``path/eek_fit.json``, each None where absent."""
    from earlyexit_kernels.integrations.model_folder import fit_certificate

    certificate = fit_certificate(path)
    if certificate is None:
        return None, None
    return 100.0 * float(certificate["budget"]), float(certificate["confidence"])


def saved_changed(path: str) -> float | None:
    """The answers-changed budget (points) certified beside accuracy lost in ``path/eek_fit.json``, or None."""
    from earlyexit_kernels.integrations.model_folder import fit_certificate

    changed = (fit_certificate(path) or {}).get("changed_budget")
    return None if changed is None else round(100.0 * float(changed), 9)


def saved_guarantee(path: str) -> str:
    """What the certificate in ``path/eek_fit.json`` promises (``"probable"`` where it says nothing: folders
    certified before there was a choice)."""
    from earlyexit_kernels.calibration.certify import guarantee_of
    from earlyexit_kernels.integrations.model_folder import fit_certificate

    return guarantee_of(fit_certificate(path) or {})


def saved_path(path: str) -> list | None:
    """The ordered candidates ``eek fit`` certified along (``certified_path`` of ``path/eek_fit.json``), or None."""
    from earlyexit_kernels.methods.policy_spec import parse_policy

    record = FitRecord.read(path)
    codes = None if record is None else record.certified_path
    if not codes or not isinstance(codes, list):
        return None
    try:
        return [parse_policy(code) for code in codes]
    except ValueError:
        return None


@dataclass(frozen=True)
class Recalibration:
    """What one re-certification of a folder is asked for (:func:`calibrate_folder`'s docstring says each field;
    ``eek calibrate``'s options): the target, ``max_drop``, ``confidence``, ``guarantee``, ``max_changed`` (each
    :data:`~earlyexit_kernels.patching.fit_record.SAVED` or None where the folder's certificate gives it, made into
    the calibration's ``Goal`` once the folder is read); the ``risk``; the base certified on, ``dtype``,
    ``device``, ``int8_layers``; how the rows are read, ``batch_size``, ``max_length``; and ``force``.
    ``batch_size`` and ``max_length`` are checked here, once, in ``eek fit``'s words."""

    # the fields of a fit setting carry its eek calibrate option's metadata (_fit_fields.FIT_FIELDS, eek fit's help
    # lines); batch_size, rows per batch here, is another setting than eek fit's
    max_drop: float | None = fit_field("max_drop", None)
    confidence: float | None | str = fit_field("confidence", SAVED)
    guarantee: str = fit_field("guarantee", SAVED)
    max_changed: float | None | str = fit_field("max_changed", SAVED)
    risk: str = fit_field("risk", "auto")
    dtype: str | None = None
    device: str = "auto"
    int8_layers: str = "auto"
    batch_size: int = 64
    max_length: int | None = fit_field("max_length", None)
    force: bool = False

    def __post_init__(self) -> None:
        from earlyexit_kernels.training.fit_config import check_count

        check_count("batch_size", self.batch_size, optional=False)
        check_count("max_length", self.max_length)


def calibrate_folder(
    path: str,
    data=None,
    settings: Recalibration | None = None,
    *,
    unlabelled=None,
    from_audit: str | None = None,
    source: str | None = None,
    **fields,
):
    """Re-certify the folder ``path`` on ``data`` (:class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`)
    and write it back; returns the :class:`~earlyexit_kernels.training.calibrate_texts.CalibrationReport`.
    ``settings``: a :class:`Recalibration` (the settings below); its fields may be given as keywords instead
    (``calibrate_folder(path, rows, max_drop=2.0)`` is ``calibrate_folder(path, rows, Recalibration(max_drop=2.0))``),
    not both.

    ``from_audit`` instead of ``data``: the file ``eek serve --audit-record`` (or
    :meth:`~earlyexit_kernels.calibration.online.OnlineCertificate.save_audit`) wrote, the
    audited rows served since the last pull-back, every head's logits: certified on as they are (no
    model run; disagreement with the full model), along the path they were recorded on, which must
    be the folder's. The served traffic becomes the certificate's rows: a restart serves it.

    ``max_drop`` (points) and ``confidence``: None / ``"saved"`` take the folder's certificate's
    (else 1 point and 0.95); ``confidence=None`` given explicitly: uncertified. ``source``: what
    the rows were (a file name), recorded in ``eek_fit.json``. ``dtype`` / ``device``: the base the
    threshold is certified on (:func:`~earlyexit_kernels.engine.layers.precision.to_base`; None: as saved),
    recorded in ``eek_fit.json`` as ``base``: certify on the base you serve. ``int8_layers``: with ``dtype`` int8,
    where the int8 layers run (``auto``: the family's recipe; ``onnxruntime``, ``openvino``, ``torch``:
    :data:`~earlyexit_kernels.engine.layers.precision.INT8_LAYERS`), the recipe recorded beside the certificate.

    ``unlabelled`` (``LabelledTexts``): unseen rows without labels, in the certificate beside ``data``'s
    (:func:`~earlyexit_kernels.training.calibrate_texts.calibrate_texts`).

    ``risk``: ``"auto"`` (default): accuracy lost against the saved full model where ``data`` has labels,
    else disagreement with it; on another base (``dtype`` int8 or bfloat16) that is ``"reference"``, the
    saved float32 full model still, so that the base's own changes and the exits' count against one budget,
    and the report gives the agreements with it separately
    (:class:`~earlyexit_kernels.training.calibrate_texts.BaseChange`). ``"agreement"``: disagreement with the
    full depth of the base certified on, whatever the rows; ``"accuracy"``: accuracy lost against that full
    depth, on the labels.

    ``max_changed`` (points): the answers changed against the full model the risk reads, certified beside
    accuracy lost (labelled rows); ``"saved"``: the folder's certificate's (none where it has none), None: none.
    An audit record (no labels) certifies the answers changed alone, at the smaller of ``max_drop`` and the saved
    ``max_changed``.

    A result that certifies no saving (the target not met, or a policy that runs every layer) is not
    written: the folder keeps its policy and ``report.kept`` says why, unless ``force``. Nothing a
    user saved is replaced by something worse without being asked.
    """
    from earlyexit_kernels.engine.layers.precision import int8_recipe_on, to_base
    from earlyexit_kernels.integrations.model_folder import load_model
    from earlyexit_kernels.training.calibrate_texts import calibrate_texts, calibration_goal
    from earlyexit_kernels.training.fit_config import FitError, settings_of
    from earlyexit_kernels.training.fit_texts import CONFIDENCE

    asked = settings_of(Recalibration, settings, fields, who="calibrate_folder", what="settings")
    max_drop, confidence, guarantee, max_changed = asked.max_drop, asked.confidence, asked.guarantee, asked.max_changed
    dtype, risk, int8_layers = asked.dtype, asked.risk, asked.int8_layers
    saved_drop, saved_confidence = saved_budget(path)
    if guarantee == SAVED:
        guarantee = saved_guarantee(path)
    if max_drop is None:
        max_drop = 1.0 if saved_drop is None else saved_drop
    if confidence == SAVED:
        confidence = CONFIDENCE if saved_confidence is None else saved_confidence
    if max_changed == SAVED:
        max_changed = saved_changed(path)
    if (data is None) == (from_audit is None):
        raise ValueError("give the rows to certify on (data) or an audit record (from_audit), one of them")
    goal = None if from_audit is not None else calibration_goal(max_drop, confidence, guarantee, max_changed)
    model, tokenizer = load_model(
        path, certified_here=True
    )  # the settings checked (the goal) before it loads  # certified here, on the base asked for
    if from_audit is not None:
        from earlyexit_kernels.training.calibrate_texts import calibrate_record

        record, served = _audit_record(path, from_audit, model)
        if max_changed is not None:  # the audit's risk is the answers changed: the smaller budget holds for both
            max_drop = min(max_drop, max_changed)
        goal = calibration_goal(max_drop, confidence, guarantee, None)
        report = calibrate_record(model, record, goal, path=saved_path(path))
        source = source or f"{record.all_logits.shape[1]} audited rows of {from_audit} (served: {served})"
        if _written(path, report, asked.force):
            _write_back(Path(path), model, report, source, "as served")
        return report
    base_change = _base_change(model, dtype, risk)
    if risk == "agreement" and base_change is None:
        data = dataclasses.replace(data, labels=None)  # disagreement with the full model, labels or not
    elif risk == "accuracy" and data.labels is None:
        raise FitError("--risk accuracy needs FILE's labels (a label column); without labels the risk is agreement")
    recipe = None
    if dtype == "int8":  # the int8 base the certificate holds for, which load_model runs again
        try:
            recipe = _recorded_recipe(path) if int8_layers == "auto" else None
            recipe = recipe or int8_recipe_on(model, int8_layers)
        except ValueError as error:
            raise FitError(str(error)) from None
    elif int8_layers != "auto":
        raise FitError(f"--layers {int8_layers} says where the int8 layers run: give --dtype int8 with it")
    try:
        # static int8 layers: the ones eek fit set on its training rows and saved in the folder
        to_base(model, dtype, asked.device, int8_recipe=recipe or "auto", saved=path)
    except ValueError as error:
        raise FitError(str(error)) from None
    report = calibrate_texts(
        model,
        tokenizer,
        data,
        goal,
        batch_size=asked.batch_size,
        max_length=asked.max_length,
        path=saved_path(path),
        unlabelled=unlabelled,
        base_change=base_change,
    )
    if _written(path, report, asked.force):
        _write_back(Path(path), model, report, source or "rows given to eek calibrate", dtype or "as saved", recipe)
    return report


def _recorded_recipe(folder: str) -> str | None:
    """The per-token int8 recipe ``folder``'s record names (chosen by ``eek fit``'s timing, or an earlier
    ``--layers``), where its runtime is installed here: ``--layers auto`` certifies those layers again rather
    than the family's. None where the record names none, or another recipe, or one that cannot run here."""
    from earlyexit_kernels.engine.layers.precision import INT8_LAYERS, runnable_int8_recipe

    record = FitRecord.read(folder)
    recorded = None if record is None else record.int8_recipe
    if recorded not in INT8_LAYERS.values() or runnable_int8_recipe(recorded)[1] is not None:
        return None
    return recorded


def _base_change(model, dtype: str | None, risk: str):
    """The :class:`~earlyexit_kernels.training.calibrate_texts.BaseChange` of certifying the saved ``model``
    on ``dtype``, or None on its own base; the reference is a copy of the saved model, made before it moves."""
    import copy

    from earlyexit_kernels.training.calibrate_texts import base_change_for

    change = base_change_for(dtype, None, risk)
    if change is not None:
        change.reference = copy.deepcopy(model)
    return change


def _written(folder: str, report, force: bool) -> bool:
    """Whether ``report``'s policy goes into ``folder``; where not, ``report.kept`` says why."""
    reason = report.saving_refused()
    if reason is None or force:
        return True
    report.kept = f"{folder} keeps its policy {report.previous_policy}: {reason} (--force writes it anyway)"
    return False


def _audit_record(folder: str, audit_file: str, model):
    """The :class:`~earlyexit_kernels.calibration.record.ExitRecord` of an audit record, checked against
    ``folder``: its path, layers and labels; and what was served when it was written."""
    from earlyexit_kernels.calibration.online import RecertifyError, load_audit_record
    from earlyexit_kernels.calibration.record import ExitRecord

    payload = load_audit_record(audit_file)
    logits = payload["all_logits"]
    path = saved_path(folder)
    codes = None if path is None else [policy.to_code() for policy in path]
    if payload.get("path") != codes:
        raise RecertifyError(
            f"{audit_file} was recorded along another certified path than {folder}'s: write it again from a "
            "server of this folder"
        )
    num_layers, num_labels = model.config.num_hidden_layers, model.config.num_labels
    if tuple(logits.shape[::2]) != (num_layers, num_labels):
        raise RecertifyError(
            f"{audit_file} holds logits of {logits.shape[0]} layers and {logits.shape[2]} labels; {folder}'s model "
            f"has {num_layers} and {num_labels}"
        )
    return ExitRecord(logits, None, None, None, policy_of(model)), payload.get("served", "?")


def _write_back(folder: Path, model, report, source: str, base: str, int8_recipe: str | None = None) -> None:
    """``report``'s policy and fit record written into ``folder`` in one swap; ``int8_recipe``: the int8
    recipe the certificate holds for (rows certified on a base, not an audit record's: "as served" keeps
    the one recorded)."""
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        shutil.copytree(folder, partial, dirs_exist_ok=True)
        # only the policy changes (the heads are fixed): rewritten in the early-exit config, the weights left
        # as saved, whatever base (bfloat16, int8) the calibration ran on
        config_path = partial / CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["policy"] = policy_to_dict(policy_of(model))
        config_path.write_text(json.dumps(config, indent=2))
        record = FitRecord.read(partial) or FitRecord()  # none, or unreadable: the new fields alone
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        record.recalibrated(report, when=when, source=source, base=base)
        if base != "as served":
            if record.int8_layers is not None and record.int8_layers.get("recipe") != int8_recipe:
                record.int8_layers = None  # the fit's choice of runtime no longer names the layers certified
            record.int8_recipe = int8_recipe
            record.int8_isa = int8_isa() if base == "int8" else None  # the CPU class certified on
        record.save(partial)
        old = folder.with_name(f".{folder.name}-replaced-{os.getpid()}")
        os.replace(folder, old)
        try:
            os.replace(partial, folder)
        except OSError:
            os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
