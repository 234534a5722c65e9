"""``eek_fit.json``: the record of a folder's fit, beside the model and its exit files.

``eek fit`` writes it (what the fit measured and chose: the policy, the curve, the certificate and the
certified path it walked); ``eek calibrate`` rewrites the threshold's fields and appends to its
``recalibrations``; the audit, the server, online re-certification, the demo and the benchmarks read
it. :class:`FitRecord` is the one place its name and keys are spelt out: every reader and writer
goes through :meth:`FitRecord.load` / :meth:`FitRecord.read` and :meth:`FitRecord.save`.

It sits in ``patching/``, beside the exit files of the same folder (:mod:`.exit_files`), below
``training/`` and ``integrations/``, so that whatever writes or reads a folder can import it; it
imports nothing of the package.

Versions: a file without ``version`` was written before the field existed (up to 2026-11-26) and
is version 1, the keys being the same; :data:`VERSION` is the one this code writes, and a file of
a later version is refused with a message saying so, not read as if it were this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FILE", "SAVED", "VERSION", "FitRecord", "FitRecordError"]

#: the record's file name inside a model folder
FILE = "eek_fit.json"
#: the version this code reads and writes; files without the field are version 1
VERSION = 1
#: a setting's value that means "as the certificate saved in the folder's record says" (``eek calibrate``'s
#: defaults, :func:`~earlyexit_kernels.integrations.model_folder.audit_settings`'): the one such sentinel
SAVED = "saved"


class FitRecordError(ValueError):
    """``eek_fit.json`` cannot be read as a fit record; the message says why and what to do."""


@dataclass
class FitRecord:
    """What ``eek fit`` (and later ``eek calibrate``) recorded about a folder's fit.

    ``report``: the fit's report, the keys of :meth:`earlyexit_kernels.training.fit_texts.FitReport.as_dict`
    in their order (``method``, ``target``, ``policy``, ``accuracy``, ..., ``certificate``,
    ``certified_path``, ``calibration_share``, and ``tries`` where ``--tries`` fitted more than one), as saved;
    ``eek calibrate`` rewrites its threshold's fields in place. ``source_model``: the classifier ``eek fit`` started from. ``base``: what ``eek
    calibrate`` certified on (``float32``, ``bfloat16``, ``int8`` or ``"as saved"``; None: not
    re-certified). ``int8_recipe``: the int8 recipe that certificate holds for, where it was
    certified on int8 (:mod:`earlyexit_kernels.engine.layers.precision`; None: none recorded). ``int8_isa``: the
    class of CPU it was certified on there (:mod:`earlyexit_kernels.engine.layers.int8_isa`: ``vnni``, ``avx512``,
    ``avx2``, ...; None: none recorded, as before the field existed). ``int8_layers``: how ``eek fit --dtype
    int8`` chose the runtime of those layers (:meth:`~earlyexit_kernels.engine.layers.runtime_choice.LayersChoice.as_dict`:
    the recipe, ``by`` ``timed``/``asked``/``family``/``only``, the CPU class, each runtime's seconds per round and
    the reason; None: not chosen by a fit, as before the field existed).
    ``recalibrations``: one entry per ``eek calibrate`` (None: none). ``version``:
    the file's format.

    Saved as one JSON object: ``version``, ``source_model``, the report's keys, ``base``,
    ``int8_recipe``, ``int8_isa``, ``int8_layers``, ``recalibrations`` (those that are None left out), indented by 2: a file written before
    ``version`` existed is saved again with the same keys in the same order, ``version`` added first.
    """

    report: dict = field(default_factory=dict)
    source_model: str | None = None
    base: str | None = None
    recalibrations: list[dict] | None = None
    version: int = VERSION
    int8_recipe: str | None = None
    int8_isa: str | None = None
    int8_layers: dict | None = None

    @property
    def base_risk(self) -> str | None:
        """What the last ``eek calibrate`` on another base measured its risk against (``"reference"``: the saved
        full model; ``"agreement"`` / ``"accuracy"``: the base's own full depth), or None where none recorded one.
        A folder fitted on int8 and not re-certified since (``eek fit --dtype int8``: ``base`` without
        ``recalibrations``) was certified against the saved full model, the one risk that fit takes."""
        if not self.recalibrations:
            return "reference" if self.base == "int8" else None
        last = self.recalibrations[-1]
        return last.get("risk") if isinstance(last, dict) else None

    # ------------------------------------------------------------------------------ reading and writing

    @classmethod
    def load(cls, folder) -> FitRecord:
        """The record of ``folder``; :class:`FitRecordError` where it has none, or one that cannot be read."""
        path = Path(folder) / FILE
        try:
            text = path.read_text()
        except OSError as error:
            raise FitRecordError(f"{path} cannot be read ({error}): fit the folder with eek fit") from None
        try:
            saved = json.loads(text)
        except ValueError as error:
            raise FitRecordError(f"{path} is not JSON ({error}): fit the folder again with eek fit") from None
        return cls.from_dict(saved, str(path))

    @classmethod
    def read(cls, folder) -> FitRecord | None:
        """The record of ``folder``, or None where it has none, or a file that is not a JSON object (what a
        reader that goes on without a record wants). A record of a later version still raises
        :class:`FitRecordError`: read as this version, it could say something it does not mean."""
        try:
            return cls.load(folder)
        except FitRecordError as error:
            if isinstance(error, _LaterVersion):
                raise
            return None

    @classmethod
    def from_dict(cls, saved, where: str = FILE) -> FitRecord:
        """The record of the JSON object ``saved`` (``where``: the file, for the messages)."""
        if not isinstance(saved, dict):
            raise FitRecordError(f"{where} holds a JSON {type(saved).__name__}, not an object: fit the folder again")
        fields = dict(saved)
        version = fields.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise FitRecordError(f"{where} has version {version!r}: a fit record's version is a whole number from 1")
        if version > VERSION:
            raise _LaterVersion(
                f"{where} is a fit record of version {version}, written by a later earlyexit_kernels; this one "
                f"reads up to version {VERSION}: upgrade earlyexit_kernels to use this folder"
            )
        return cls(
            source_model=fields.pop("source_model", None),
            base=fields.pop("base", None),
            int8_recipe=fields.pop("int8_recipe", None),
            int8_isa=fields.pop("int8_isa", None),
            int8_layers=fields.pop("int8_layers", None),
            recalibrations=fields.pop("recalibrations", None),
            report=fields,
            version=version,
        )

    def as_dict(self) -> dict:
        """The JSON object saved (see the class)."""
        saved = {"version": self.version}
        if self.source_model is not None:
            saved["source_model"] = self.source_model
        saved.update(self.report)
        if self.base is not None:
            saved["base"] = self.base
        if self.int8_recipe is not None:
            saved["int8_recipe"] = self.int8_recipe
        if self.int8_isa is not None:
            saved["int8_isa"] = self.int8_isa
        if self.int8_layers is not None:
            saved["int8_layers"] = self.int8_layers
        if self.recalibrations is not None:
            saved["recalibrations"] = self.recalibrations
        return saved

    def save(self, folder) -> Path:
        """Write the record into ``folder`` (replacing one there); returns the file's path."""
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    # ------------------------------------------------------------------------------ what readers ask

    @property
    def policy(self) -> str | None:
        """The fitted (or re-certified) policy, as code (``"Entropy(0.3)"``)."""
        return self.report.get("policy")

    @property
    def target(self) -> str | None:
        """What the threshold was calibrated on: ``"accuracy"`` or ``"agreement"`` (with the full model)."""
        return self.report.get("target")

    @property
    def certificate(self):
        """The certificate's fields as saved (a dict), or None where the fit did not certify."""
        return self.report.get("certificate")

    @property
    def certified_path(self):
        """The ordered candidates ``eek fit`` certified along, as policy codes (a list), or None."""
        return self.report.get("certified_path")

    def recalibrated(self, report, *, when: str, source: str, base: str) -> None:
        """Record an ``eek calibrate`` whose result is ``report``
        (:class:`~earlyexit_kernels.training.calibrate_texts.CalibrationReport`): the threshold's fields of
        :attr:`report` rewritten in place, ``base`` set, and an entry appended to :attr:`recalibrations`."""
        history = list(self.recalibrations or [])
        entry = {
            "when": when,
            "source": source,
            "rows": report.rows,
            "previous_policy": report.previous_policy,
            "policy": report.policy,
            "previous_mean_layers": report.previous_mean_layers,
            "mean_layers": report.mean_layers,
            "base": base,
        }
        if getattr(report, "base_risk", None) is not None:
            # on another base: what the risk was measured against ("reference": the saved full model)
            entry["risk"] = report.base_risk
        history.append(entry)
        self.report.update(
            policy=report.policy,
            target=report.target,
            accuracy=report.accuracy,
            full_accuracy=report.full_accuracy,
            mean_layers=report.mean_layers,
            met=report.met,
            confidence=report.confidence,
            certificate=report.certificate,
            calibration_rows=report.rows,
            calibration_source=f"from {source} (eek calibrate)",
        )
        self.base, self.recalibrations = base, history


class _LaterVersion(FitRecordError):
    """A record of a version this code does not know (:meth:`FitRecord.read` lets it through)."""
