"""The rows a fit reads, prepared once: checked, tokenized and split (:func:`prepare` -> :class:`FitData`).

``eek fit`` and :func:`~earlyexit_kernels.training.fit_texts.fit_model` take texts: training and
validation rows, maybe calibration rows the classifier never saw and unlabelled rows. Before any
head trains, :func:`prepare` checks the method against the labels and the rows against the
certificate's needs, tokenizes every part once, and, where no calibration rows are given but a
certificate is asked for, keeps a share of the training rows out to certify on (a measured share,
:mod:`earlyexit_kernels.training.calibration_share`, or a fixed fraction).
:func:`~earlyexit_kernels.training.fit_texts.fit_model` reads the result and nothing else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from earlyexit_kernels.training.fit_config import (
    AUTO_SHARE,
    CALIBRATION_FRACTION,
    FitConfig,
    FitError,
    check_enough,
    check_kept_out,
    check_method_labels,
    least_rows_to_certify,
)

__all__ = ["FitData", "prepare", "max_length_for", "warn_truncated"]


@dataclass
class FitData:
    """A fit's rows, tokenized (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`), with their
    class ids (LongTensor [N], or None without labels: the heads then learn agreement with the full model).

    ``calibration``: rows kept out of training to calibrate and certify on (None: the validation rows);
    ``calibration_labels``: their ids (None: certified on agreement); ``unlabelled``: more unseen rows
    without labels for the certificate; ``share``: how the kept-out share was measured
    (:class:`~earlyexit_kernels.training.calibration_share.ShareChoice`, None where it was not);
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
            from earlyexit_kernels.training.calibration_share import ShareSettings, choose_share

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
        from earlyexit_kernels.training.calibration_share import encoded_subset

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
    positions = getattr(model.config, "max_position_embeddings", 512)
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
