"""The fit's settings as the command line shows them, free of torch: each setting's help line, metavar, what None
means and its choices, written once here and attached as ``metadata`` to the fields that hold the setting:
``FitConfig``'s and ``Training``'s (``training/fit_config.py``), the calibration ``Goal``'s
(``calibration/select.py``) and ``eek calibrate``'s ``Recalibration``'s (``integrations/recertify_folder.py``), as
:class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`'s fields carry the engine's.

:mod:`earlyexit_kernels.integrations.cli_options` makes ``eek fit``'s and ``eek calibrate``'s options from it. The
settings' modules import torch, which ``eek --help`` does not; so the text sits here, beside
:mod:`earlyexit_kernels._method_names`, and the fields point at it (``python_tests/test_fit_options.py`` holds each
field's metadata to be this table's entry, and each command line's help, bound and default to be the field's).
A setting's bound is not here: it is checked once, by its settings object, whose refusal names the flag.
"""

from __future__ import annotations

import dataclasses

from earlyexit_kernels._method_names import METHODS

__all__ = ["FIT_FIELDS", "HEAD_CHOICES", "POOLING_CHOICES", "RISK_CHOICES", "fit_field", "option"]

#: ``--pooling`` and ``--head``: ``"auto"`` and :data:`earlyexit_kernels.engine.step.heads.HEAD_POOLINGS` /
#: ``HEAD_FORMS`` (written out, free of torch; ``python_tests/test_fit_cli.py`` holds them equal)
POOLING_CHOICES = ("auto", "cls", "mean")
HEAD_CHOICES = ("auto", "model", "mlp", "cascade")
#: ``eek calibrate --risk``: ``"auto"`` and :data:`earlyexit_kernels.training.calibrate_texts.BASE_RISKS`
RISK_CHOICES = ("auto", "reference", "agreement", "accuracy")


def option(help: str, metavar: str | None = None, *, none: str | None = None, choices=None) -> dict:
    """A field's command-line metadata: its help line, its metavar, what None means, its choices (the shape of
    :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`'s)."""
    return {"help": help, "metavar": metavar, "none": none, "choices": choices}


#: each fit setting's command-line metadata, by its field's name (the flag: ``--`` and the name, ``-`` for ``_``)
FIT_FIELDS = {
    "method": option(
        "the recipe: heads trains only the internal heads of the frozen model, fast; joint: then backbone and heads "
        "together for an epoch of the model (docs/training.md); the others train the backbone too with their "
        "paper's loss (docs/exit_methods.md); all but heads and fastbert need labels",
        choices=METHODS,
    ),
    "pooling": option(
        "what the heads read: auto trains each and keeps the one running the fewest layers within --max-drop on "
        "the validation rows",
        choices=POOLING_CHOICES,
    ),
    "head": option(
        "the heads' form: model, mlp, or cascade (an MLP that also reads the head below's logits); auto: chosen "
        "as --pooling is",
        choices=HEAD_CHOICES,
    ),
    "max_drop": option("most accuracy (or agreement) points lost against the full model", "POINTS"),
    "confidence": option(
        "certify --max-drop with this probability over the draw of the calibration rows; 'off': an uncertified "
        "threshold, the fewest layers within --max-drop on the rows calibrated on (eek fit without --calibration: "
        "the validation rows)",
        "P",
        none="off",
    ),
    "guarantee": option(
        "what the certificate promises: 'probable', with probability --confidence over the draw of the calibration "
        "rows, at most --max-drop points are lost; 'expected', at most --max-drop on average over that draw "
        "(conformal risk control: cheaper, and any one draw may lose more)",
        choices=("probable", "expected"),
    ),
    "max_changed": option(
        "also certify that at most POINTS in 100 answers differ from the full model's (the one accuracy lost is "
        "measured against), beside --max-drop, at the same confidence: accuracy lost lets an exit's fixes of the "
        "full model's errors pay for as many new errors, so alone it does not bound how many answers change. "
        "Labelled rows; 'off': none",
        "POINTS",
        none="none",
    ),
    "calibration_fraction": option(
        "without --calibration: the part of the training rows (TRAIN_FILE less its validation split) kept out of "
        "training to certify the threshold on; auto: all but the rows the heads need, measured by training them on "
        "256, 512, ... rows until a doubling no longer gains measurably on the validation rows (else 0.25)",
        "FRACTION",
    ),
    "validation_split": option(
        "hold out this fraction of TRAIN_FILE for validation", "FRACTION", none="0.1 without --validation"
    ),
    "tries": option(
        "fit N times, at seeds SEED, SEED+1, ... (each draws its own validation split, rows kept out, first weights "
        "and order), certify each try at a Bonferroni share of --confidence (1 - (1 - C) / N) and keep the one that "
        "certifies the fewest layers: the choice holds at --confidence. Costs N fits' time; the probable guarantee "
        "only",
        "N",
    ),
    "epochs": option("training epochs", "N", none="the method's recipe"),
    "lr": option("learning rate", "LR", none="the method's recipe"),
    "batch_size": option("rows per training step", "N"),
    "max_length": option("longer texts are truncated", "N", none="the model's"),
    "seed": option(
        "seed of the validation split, the calibration split, the training order and the heads' initial weights: "
        "the same seed on the same rows fits the same heads",
        "N",
    ),
    "progress": option("progress bars", none="when stderr is a terminal"),
    "risk": option(
        "what the certificate bounds. 'auto' and 'reference': against the saved float32 full model (the one you "
        "validated): accuracy lost where FILE has labels, disagreement where not; with --dtype int8 or bfloat16 the "
        "base's own changes and the exits' count together against the one budget. 'agreement': disagreement with the "
        "full depth of the base certified on, labelled rows or not (what the exits add to the base); 'accuracy': "
        "accuracy lost against that full depth, on FILE's labels",
        choices=RISK_CHOICES,
    ),
}


def fit_field(name: str, default):
    """A settings object's field of the fit setting ``name``: its ``default``, its command-line metadata
    (:data:`FIT_FIELDS`)."""
    return dataclasses.field(default=default, metadata=FIT_FIELDS[name])
