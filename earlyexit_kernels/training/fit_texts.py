"""``eek fit`` as a library: a fine-tuned classifier and texts (labelled or not) to certified exits.

:func:`fit_model` takes the fit's settings as one :class:`~earlyexit_kernels.training.fit_config.FitConfig` (or its
fields as keywords), has the rows prepared (:func:`prepare`, below: checked,
tokenized, a share kept out to certify on) and fits the heads on them, under the config's seed; the command line
(:mod:`earlyexit_kernels.integrations.fit_cli`) only reads the files, calls it (through
:func:`~earlyexit_kernels.integrations.fit_folder.fit_folder`) and writes the folder.

:func:`~earlyexit_kernels.training.fit.fit_heads` patches the model with the method's policy family (and the
heads' pooling and form), trains it with
the method's recipe (:mod:`earlyexit_kernels.training.recipes`), certifies the threshold on
calibration rows no training step saw (a share of the training rows kept out, or the rows the
user gives) and re-patches the model with it; :class:`FitReport` is what ``eek fit`` prints and
saves (``eek_fit.json``). Without labels the heads learn the final classifier's predictions
(self-distillation) and the threshold is certified on agreement with the full model.

**The rows, prepared once** (:func:`prepare` -> :class:`FitData`). ``eek fit`` and :func:`fit_model` take texts:
training and validation rows, maybe calibration rows the classifier never saw and unlabelled rows. Before any
head trains, :func:`prepare` checks the method against the labels and the rows against the
certificate's needs, tokenizes every part once, and, where no calibration rows are given but a
certificate is asked for, keeps a share of the training rows out to certify on (a measured share,
:mod:`earlyexit_kernels.training.share_probe`, or a fixed fraction). :func:`fit_model` reads the result and
nothing else.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import torch

from earlyexit_kernels._method_names import METHODS, UNLABELLED_METHODS
from earlyexit_kernels.calibration.candidates import PATH_SPLITS
from earlyexit_kernels.calibration.certify import describe_certificate
from earlyexit_kernels.training.fit_config import (
    AUTO_SHARE,
    CALIBRATION_FRACTION,
    CONFIDENCE,
    FitConfig,
    FitError,
    check_enough,
    check_kept_out,
    check_method_labels,
    least_rows_to_certify,
    settings_of,
)

__all__ = [
    "AUTO_SHARE",
    "CALIBRATION_FRACTION",
    "CONFIDENCE",
    "FitConfig",
    "FitData",
    "FitError",
    "FitReport",
    "METHODS",
    "UNLABELLED_METHODS",
    "fit_model",
    "max_length_for",
    "prepare",
    "warn_truncated",
]


@dataclass
class FitReport:
    """What ``eek fit`` did: the method, rows, calibration (on validation) and timings.

    ``accuracy`` / ``full_accuracy`` are on the validation rows, fractions; with
    ``target == "agreement"`` they are agreement with the full model (and full is 1.0).
    ``train_seconds``: the training stages; ``calibrate_seconds``: the rest of the fit (the
    frozen model's passes over the rows, the calibration). With ``confidence``: the policy is
    certified on ``calibration_rows`` rows kept out of training, and ``certificate`` holds
    :class:`~earlyexit_kernels.calibration.certify.Certificate`'s fields (budget,
    bound reached, uncertified point's layers, rows needed when nothing was certified). ``tries``: with
    ``--tries`` above 1, what each try certified (:func:`~earlyexit_kernels.training.fit_tries.try_summary`), the
    kept one's report being this one (empty: one fit).
    """

    method: str
    target: str
    policy: str
    accuracy: float
    full_accuracy: float
    mean_layers: float
    num_layers: int
    met: bool
    train_rows: int
    validation_rows: int
    train_seconds: float
    calibrate_seconds: float
    curve: list[tuple[str, float, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pooling: str | None = None
    head: str | None = None
    stages: list[str] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)
    confidence: float | None = None
    calibration_rows: int = 0
    certificate: dict | None = None
    head_trials: list[dict] = field(default_factory=list)
    head_choice: str = "given"
    calibration_source: str = "kept out of training"
    validation_full_accuracy: float | None = None
    certified_path: list[str] = field(default_factory=list)
    calibration_share: str | None = None
    tries: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, result, model, data: FitData, config: FitConfig) -> FitReport:
        """The report of :func:`~earlyexit_kernels.training.fit.fit_heads`' ``result`` on ``data``'s rows for
        ``config``, ``model`` patched with the calibrated policy (the pooling and head form the fit chose)."""
        from earlyexit_kernels.calibration.candidates import describe, distinct_digits

        calibration = result.calibration
        digits = distinct_digits([p.policy for p in calibration.curve])
        heads_config = getattr(model.early_exit_heads, "config", None)
        train_seconds = sum(stage.log.seconds for stage in result.stages)
        return cls(
            method=config.method,
            target=calibration.measure,
            policy=describe(calibration.policy, 4),
            accuracy=calibration.accuracy,
            full_accuracy=calibration.full_accuracy,
            mean_layers=calibration.mean_layers,
            num_layers=model.config.num_hidden_layers,
            met=calibration.met,
            train_rows=len(data.train),
            validation_rows=len(data.validation),
            train_seconds=train_seconds,
            calibrate_seconds=result.seconds - train_seconds,
            curve=[(describe(p.policy, digits), p.accuracy, p.mean_layers) for p in calibration.curve],
            warnings=list(result.warnings),
            pooling=getattr(heads_config, "pooling", config.pooling),
            head=getattr(heads_config, "head", config.head),
            stages=[stage.describe() for stage in result.stages],
            layer_scores=list(calibration.layer_scores),
            confidence=config.confidence,
            calibration_rows=len(data.validation if data.calibration is None else data.calibration),
            certificate=None if calibration.certificate is None else calibration.certificate.as_dict(),
            head_trials=[vars(trial) for trial in result.head_trials],
            head_choice=result.head_choice,
            validation_full_accuracy=result.validation_full_accuracy,
            certified_path=[policy.to_code() for policy in calibration.path],
            calibration_share=None if data.share is None else data.share.describe(),
        )

    def as_dict(self) -> dict:
        """The fields as ``eek_fit.json`` saves them: ``tries`` only where there were (a one-try fit's record is
        what it was before there were tries)."""
        return {k: v for k, v in vars(self).items() if k != "tries" or v}

    def summary(self) -> list[str]:
        """The lines ``eek fit`` prints: the compact curve, then the chosen point."""
        what = "agreement with the full model" if self.target == "agreement" else "accuracy"
        # the calibration rows: kept out of training when certifying, or given; else the validation rows
        own_rows = self.confidence is not None or self.calibration_source != "kept out of training"
        calibrated = (
            f"{self.calibration_rows} calibration rows {self.calibration_source}"
            if own_rows
            else f"{self.validation_rows} validation rows"
        )
        lines = [
            f"fitted the exit heads ({self.method}) on {self.train_rows} rows and calibrated them on "
            f"{calibrated} in {self.train_seconds + self.calibrate_seconds:.1f} s "
            f"({self.train_seconds:.1f} s in the training stages; the rest: the model's passes over the rows "
            f"and the calibration)"
        ]
        if self.calibration_share:
            lines.append(self.calibration_share)
        lines += [f"  stage {i}: {stage}" for i, stage in enumerate(self.stages, start=1)]
        if self.head_trials:
            from earlyexit_kernels.training.head_choice import HeadTrial, describe_trials

            lines += describe_trials([HeadTrial(**t) for t in self.head_trials], self.target, self.num_layers)
        elif self.head_choice not in ("given", "auto"):
            lines.append(f"heads: {self.head_choice}")
        where = "calibration rows" if own_rows else "validation"
        if self.layer_scores:
            scores = " ".join(f"{k}:{100 * a:.1f}" for k, a in enumerate(self.layer_scores, start=1))
            lines.append(f"{what} of each layer's head alone on {where}: {scores}")
        lines.append(f"candidates ({what} on {where}, mean layers of {self.num_layers}; uncertified):")
        lines += ["  " + line for line in _compact_curve(self.curve)]
        full = "" if self.target == "agreement" else f" (full model {100 * self.full_accuracy:.2f}%)"
        lines.append(
            f"chosen: {self.policy}: {what} {100 * self.accuracy:.2f}%{full}, {self.mean_layers:.2f} mean layers "
            f"of {self.num_layers} (ideal speed-up {self.num_layers / self.mean_layers:.2f}x)"
            + ("" if self.met else " - the target was NOT met")
        )
        if self.certificate is not None and self.certificate.get("path_layers"):
            lines.append(_describe_paths(self.certificate, self.validation_rows))
        elif self.certificate is not None and self.certificate.get("path") == "global":
            from earlyexit_kernels.calibration.candidates import per_layer_rows_needed

            needed = per_layer_rows_needed(self.certificate["budget"])
            if self.validation_rows < needed:
                lines.append(
                    f"path: global (the per-layer path sets its thresholds on half the validation rows and needs "
                    f"{needed} of them at this budget to see its errors; there are {self.validation_rows})"
                )
        if self.tries:
            from earlyexit_kernels.training.fit_tries import describe_tries, kept_try

            lines.append(describe_tries(self.tries, kept_try(self.tries), self.confidence, self.num_layers))
        if self.certificate is not None and self.certificate["certified"]:  # else it is one of the warnings
            lines.append(describe_certificate(self.certificate))
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def _describe_paths(certificate: dict, rows: int) -> str:
    """Which path was certified along, and what each needed on the held-out halves of the validation rows."""
    needed = ", ".join(
        f"{name.replace('_', '-')} {'none within the budget' if layers is None else f'{layers:.2f} layers'}"
        for name, layers in certificate["path_layers"].items()
    )
    return (
        f"path: {certificate['path'].replace('_', '-')} (the mean layers each path's certificate would keep on "
        f"calibration rows like half of the {rows} validation rows, the mean over {2 * PATH_SPLITS} held-out halves: "
        f"{needed})"
    )


def _compact_curve(curve: list[tuple[str, float, float]], rows: int = 8) -> list[str]:
    """At most ``rows`` candidates, spread over the range of mean layers."""
    if not curve:
        return []
    points = sorted(curve, key=lambda p: (p[2], p[1]))
    if len(points) > rows:
        step = (len(points) - 1) / (rows - 1)
        points = [points[round(i * step)] for i in range(rows)]
    width = max(len(p[0]) for p in points)
    return [f"{name:<{width}}  {100 * acc:6.2f}%  {layers:5.2f} layers" for name, acc, layers in points]


def fit_model(
    model,
    tokenizer,
    train,
    validation,
    config: FitConfig | None = None,
    *,
    calibration=None,
    unlabelled=None,
    reference=None,
    **fields,
) -> FitReport:
    """Train and calibrate the exit heads of ``model`` in place; what ``eek fit`` does between reading and writing.

    ``model``: a patched classifier (any policy; it is re-patched with the method's).
    ``train``, ``validation``: :class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`;
    without labels the heads learn the final classifier's predictions and the threshold is
    calibrated on agreement with it. Returns the :class:`FitReport`; the model ends patched
    with the calibrated policy, in eval mode.

    ``config``: the fit's settings, one :class:`~earlyexit_kernels.training.fit_config.FitConfig` (what the command
    line builds once; its docstring gives each field's default), or its fields as keywords
    (``fit_model(..., max_drop=2.0)`` is ``fit_model(..., FitConfig(max_drop=2.0))``), not both. ``pooling`` /
    ``head``: ``"auto"`` (the default) tries every configuration on one pass of the model and keeps the one that
    runs the fewest layers within the budget on the validation rows (:mod:`earlyexit_kernels.training.head_choice`).

    ``confidence`` (in (0, 1); None: uncertified, on the validation rows): keep rows of ``train``
    out of head training and early stopping, and certify on them that the policy loses at most
    ``max_drop`` points with that confidence
    (:mod:`earlyexit_kernels.calibration.certify`); how many: ``calibration_fraction``
    of them, or with ``"auto"`` (the default) all but those the heads need, measured
    (:mod:`earlyexit_kernels.training.share_probe`). ``calibration``
    (:class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`, labelled or not): rows the
    classifier never trained on, certified on instead, and every row of ``train`` trains the
    heads; without labels (or with ``train`` unlabelled) the certified risk is agreement with the
    full model. Rows too few to certify even a policy that never errs raise :class:`FitError`
    with the number needed; ``validation_split``: the share of the user's file that ``validation``
    was split from before ``train`` was given (None: validation came from elsewhere), so that
    the number is that of the file.

    ``unlabelled`` (:class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`, labels ignored): more
    unseen rows without labels, in the certificate beside the calibration rows (agreement: as more rows;
    accuracy lost: :mod:`~earlyexit_kernels.calibration.prediction_powered`); a ``calibration`` whose label
    cells are partly empty gives its unlabelled rows the same way.

    ``guarantee``: what the certificate promises, ``"probable"`` (the default: with probability ``confidence``)
    or ``"expected"`` (on average over the draw of the calibration rows, conformal risk control; cheaper, and
    any one draw may serve above the budget): :data:`~earlyexit_kernels.calibration.certify.GUARANTEES`.
    ``max_changed`` (points; with ``confidence`` and labelled calibration rows, without unlabelled ones): also
    certify that at most that many answers in 100 differ from the full model's, beside ``max_drop``
    (``eek fit --max-changed``, as ``eek calibrate`` takes it); None: not bounded.

    ``reference``: where ``model`` runs on another base (its encoder int8), the model on the base the user
    validated, whose full depth the certificate measures against
    (:func:`~earlyexit_kernels.training.fit_exit_heads`); None: ``model``'s own.

    ``seed`` fixes everything drawn: the splits, the order of the rows, and the heads' initial
    weights (torch's generator is seeded inside, and given back as it was). ``tries``: 1 here, which fits the model
    it is given once; :func:`~earlyexit_kernels.integrations.fit_folder.fit_folder` (``eek fit --tries N``) loads
    the model anew for each of N tries and keeps one (:mod:`~earlyexit_kernels.training.fit_tries`).
    """
    from earlyexit_kernels.training.fit import HeadsFit, fit_heads

    config = settings_of(FitConfig, config, fields, who="fit_model", what="config")
    if config.tries != 1:
        raise FitError(
            f"tries={config.tries}: fit_model fits the model it is given once; fit_folder (what eek fit runs), which "
            "loads the model anew for each try, runs the tries"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        data = prepare(model, tokenizer, train, validation, config, calibration=calibration, unlabelled=unlabelled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the calibration's warnings are in its result, printed by the report
            result = fit_heads(
                model,
                data.batches(config.batch_size, config.seed),
                HeadsFit(training=config.training, goal=config.goal, labels=data.train_labels is not None),
                reference=reference,
            )
    model.eval()
    report = FitReport.of(result, model, data, config)
    if data.calibration_given:
        report.calibration_source = "given (--calibration)"
    elif config.confidence is not None and config.validation_split is None:
        warning = fine_tuning_rows_warning(report)
        if warning is not None:
            report.warnings.append(warning)
    return report


def fine_tuning_rows_warning(report: FitReport) -> str | None:
    """A warning when the full model is clearly better on the calibration rows kept out of the training
    file than on the validation rows (given apart): the file is likely what it was fine-tuned on.

    "Clearly": more than one point and more than two standard errors of the difference of the two
    accuracies (pooled); the calibration rows then make every exit look worse than it will be."""
    if report.target != "accuracy" or report.validation_full_accuracy is None or not report.calibration_rows:
        return None
    here, there = report.full_accuracy, report.validation_full_accuracy
    n1, n2 = report.calibration_rows, report.validation_rows
    pooled = (here * n1 + there * n2) / (n1 + n2)
    standard_error = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n1 + 1 / n2))
    if here - there <= max(0.01, 2 * standard_error):
        return None
    return (
        f"the full model is right on {100 * here:.1f}% of the {n1} calibration rows kept out of the training file "
        f"but on {100 * there:.1f}% of the {n2} validation rows: it was likely fine-tuned on the training file, "
        f"where every exit looks worse than it will on new rows and the certified threshold runs deeper than it "
        f"needs to. Certify on rows it never saw: --calibration FILE (its validation split, or unlabelled rows of "
        f"what it will serve), or eek calibrate FOLDER FILE afterwards"
    )


@dataclass
class FitData:
    """A fit's rows, tokenized (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`), with their
    class ids (LongTensor [N], or None without labels: the heads then learn agreement with the full model).

    ``calibration``: rows kept out of training to calibrate and certify on (None: the validation rows);
    ``calibration_labels``: their ids (None: certified on agreement); ``unlabelled``: more unseen rows
    without labels for the certificate; ``share``: how the kept-out share was measured
    (:class:`~earlyexit_kernels.training.share_probe.ShareChoice`, None where it was not);
    ``calibration_given``: whether the calibration rows were the user's own (``--calibration``)."""

    train: object
    train_labels: torch.Tensor | None
    validation: object
    validation_labels: torch.Tensor | None
    calibration: object | None = None
    calibration_labels: torch.Tensor | None = None
    unlabelled: object | None = None
    share: object | None = None
    calibration_given: bool = False

    def batches(self, batch_size: int, seed: int):
        """The rows as :func:`~earlyexit_kernels.training.fit.fit_heads` takes them
        (:class:`~earlyexit_kernels.training.fit.HeadBatches`): the training rows shuffled with ``seed`` in batches of
        ``batch_size``, the others length-sorted in batches of 64."""
        from earlyexit_kernels.training.fit import HeadBatches
        from earlyexit_kernels.training.labelled_texts import length_sorted_batches, shuffled_batches

        def sorted_batches(rows, labels):
            return None if rows is None else length_sorted_batches(rows, labels, 64)

        return HeadBatches(
            shuffled_batches(self.train, self.train_labels, batch_size, seed),
            sorted_batches(self.validation, self.validation_labels),
            sorted_batches(self.calibration, self.calibration_labels),
            sorted_batches(self.unlabelled, None),
        )


def prepare(model, tokenizer, train, validation, config: FitConfig, *, calibration=None, unlabelled=None) -> FitData:
    """The rows of a fit (:class:`~earlyexit_kernels.training.labelled_texts.LabelledTexts`, as
    :func:`~earlyexit_kernels.training.fit_texts.fit_model` takes them) checked, tokenized and split
    for ``config``. Raises :class:`~earlyexit_kernels.training.fit_config.FitError` with what to fix.
    Draws (the kept-out share) use ``config.seed``; the measured share trains heads on ``model``."""
    from earlyexit_kernels.training.labelled_texts import encode, joined_texts, label_ids, split_unlabelled

    length = max_length_for(config.max_length, model, tokenizer)
    train_ids = label_ids(train, model.config) if train.labels is not None else None
    val_ids = label_ids(validation, model.config) if validation.labels is not None else None
    if (train_ids is None) != (val_ids is None):
        raise FitError("the training rows and the validation rows must both have labels, or neither")
    check_method_labels(config.method, train_ids is not None)
    calibration_ids = encoded_calibration = encoded_unlabelled = None
    given_calibration = calibration is not None
    if calibration is not None:
        calibration, partly = split_unlabelled(calibration)
        unlabelled = joined_texts(partly, unlabelled)
    if config.max_changed is not None and (
        train_ids is None or unlabelled is not None or (calibration is not None and calibration.labels is None)
    ):
        raise FitError(
            "--max-changed is certified beside accuracy lost, on labelled rows alone: give labelled training rows "
            "(and a labelled --calibration FILE, if any), without unlabelled rows, or leave --max-changed out"
        )
    if unlabelled is not None:
        if config.confidence is None:
            raise FitError(
                "unlabelled rows (--unlabelled) join the certificate: give a --confidence, or leave them out"
            )
        unlabelled = joined_texts(unlabelled, None)  # its labels, if any, are not read
        encoded_unlabelled = encode(tokenizer, unlabelled, length)
    if calibration is not None:
        if config.confidence is not None:
            check_enough(
                len(calibration),
                config.max_drop,
                config.confidence,
                "calibration rows (--calibration)",
                config.guarantee,
            )
        calibration_ids = label_ids(calibration, model.config) if calibration.labels is not None else None
        if train_ids is None:
            calibration_ids = None  # the heads learn agreement: certify agreement too
    encoded_train, encoded_val = encode(tokenizer, train, length), encode(tokenizer, validation, length)
    share = None
    if calibration is None and config.confidence is not None:
        if config.calibration_fraction == AUTO_SHARE:
            from earlyexit_kernels.training.share_probe import ShareSettings, choose_share

            settings = ShareSettings(
                method=config.method,
                pooling=config.pooling,
                head=config.head,
                least=least_rows_to_certify(config.max_drop, config.confidence, config.guarantee),
                fraction=CALIBRATION_FRACTION,
                seed=config.seed,
                budget=config.max_drop / 100.0,
                confidence=config.confidence,
            )
            share = choose_share(model, encoded_train, train_ids, encoded_val, val_ids, settings)
            rest, held, fraction = share.train, share.calibration, CALIBRATION_FRACTION
        else:
            rest, held, fraction = _split_for_calibration(len(train), config.calibration_fraction, config.seed)
        check_kept_out(
            len(rest),
            len(held),
            config.max_drop,
            config.confidence,
            fraction,
            config.validation_split,
            config.guarantee,
        )
        from earlyexit_kernels.training.share_probe import encoded_subset

        train, calibration = train.subset(rest), train.subset(held)
        encoded_train, encoded_calibration = encoded_subset(encoded_train, rest), encoded_subset(encoded_train, held)
        train_ids = None if train_ids is None else train_ids[rest]
        calibration_ids = label_ids(calibration, model.config) if calibration.labels is not None else None
    elif calibration is not None:
        encoded_calibration = encode(tokenizer, calibration, length)
    for encoded in (encoded_train, encoded_val, encoded_calibration):
        if encoded is not None:
            warn_truncated(encoded)
    return FitData(
        train=encoded_train,
        train_labels=train_ids,
        validation=encoded_val,
        validation_labels=val_ids,
        calibration=encoded_calibration,
        calibration_labels=calibration_ids,
        unlabelled=encoded_unlabelled,
        share=share,
        calibration_given=given_calibration,
    )


def max_length_for(asked: int | None, model, tokenizer) -> int:
    """The tokens a row keeps: ``asked`` (``--max-length``), at most what the model's positions and the
    tokenizer hold (None: that limit)."""
    from earlyexit_kernels.engine.stream.stream_surface import model_max_length

    positions = model_max_length(model)  # the serving engines' rule: RoBERTa's positions start after the padding
    limit = min(positions, tokenizer.model_max_length or positions)
    if asked is None:
        return limit
    if asked > limit:
        raise FitError(f"--max-length {asked} is more than the model's positions hold ({limit})")
    return asked


def warn_truncated(encoded) -> None:
    """One line on stderr where tokenizing cut rows short."""
    if encoded.truncated:
        print(
            f"warning: {encoded.truncated} texts are longer than {encoded.max_length} tokens and were truncated",
            file=sys.stderr,
        )


def _split_for_calibration(count: int, fraction, seed: int) -> tuple[list[int], list[int], float]:
    """``(rest, held, fraction)``: a random ``fraction`` of ``count`` training rows held out to certify on
    (``fraction`` checked by :class:`~earlyexit_kernels.training.fit_config.FitConfig`)."""
    from earlyexit_kernels.training.labelled_texts import split_rows

    rest, held = split_rows(count, fraction, seed + 1, option="--calibration-fraction", held_as="calibration")
    return rest, held, fraction
