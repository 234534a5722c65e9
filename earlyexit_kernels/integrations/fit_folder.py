"""A classifier folder fitted and written: what ``eek fit`` does once it has read its files.

    report = fit_folder(model_path, train, validation, output, config=config, calibration=rows, dtype="int8")

:func:`fit_folder` loads the classifier (:func:`~earlyexit_kernels.integrations.model_folder.load_classifier`), fits
its heads and certifies them (:func:`~earlyexit_kernels.training.fit_texts.fit_model`), on the int8 layers timed
fastest on this CPU where ``dtype`` is int8 (:mod:`earlyexit_kernels.integrations.int8_fit`), once or ``config.tries``
times, and writes the folder under a temporary name, renamed into place when complete (:func:`save_fitted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.integrations.model_folder import load_classifier
from earlyexit_kernels.patching.fit_record import FitRecord

__all__ = ["fit_folder", "save_fitted"]


def save_fitted(
    model,
    tokenizer,
    report,
    output: Path,
    *,
    overwrite: bool,
    source: str,
    choice=None,
) -> None:
    """Write the fitted model, its tokenizer and ``eek_fit.json`` under a temporary name beside
    ``output``, then rename it into place. ``choice``: the heads were fitted and certified on the int8 base
    with the layers it chose (:class:`~earlyexit_kernels.engine.layers.runtime_choice.LayersChoice`,
    :mod:`earlyexit_kernels.integrations.int8_fit`), its recipe recorded as the base the certificate holds for
    and the choice as ``int8_layers``; None: on the model as saved."""
    from earlyexit_kernels.training.fit_texts import FitError

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        on_int8 = choice is not None
        FitRecord(
            report=report.as_dict(),
            source_model=source,
            base="int8" if on_int8 else None,
            int8_recipe=choice.recipe if on_int8 else None,
            int8_isa=int8_isa() if on_int8 else None,  # the CPU class the int8 certificate holds for
            int8_layers=choice.as_dict() if on_int8 else None,
        ).save(partial)
        if on_int8 and choice.static_layers is not None:  # set on training rows: saved, as they cannot be remade
            from earlyexit_kernels.engine.layers.ov_static import save_static_layers

            save_static_layers(choice.static_layers, partial)
        if output.exists():
            if not overwrite and any(output.iterdir()):
                raise FitError(f"OUTPUT_DIR {output} appeared while fitting; pass --overwrite to replace it")
            shutil.rmtree(output)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fit_folder(
    model_path: str,
    train,
    validation,
    output: str,
    *,
    config=None,
    calibration=None,
    unlabelled=None,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = True,
    int8_layers: str = "auto",
    int8_traffic: str = "both",
    **options,
):
    """The classifier folder ``model_path`` fitted (:func:`~earlyexit_kernels.training.fit_texts.fit_model`) and
    written to ``output``: what ``eek fit`` does once it has read its files. Returns the
    :class:`~earlyexit_kernels.training.fit_texts.FitReport`.

    ``config``: a :class:`~earlyexit_kernels.training.fit_config.FitConfig` (what the command line builds once), or
    :func:`~earlyexit_kernels.training.fit_texts.fit_model`'s keyword ``options``, not both. ``validation``: the
    validation rows, or None: a share ``config.validation_split`` (0.1 where None) of ``train`` held out, drawn
    with the seed. ``calibration``,
    ``unlabelled``: as :func:`~earlyexit_kernels.training.fit_texts.fit_model` takes them. ``dtype``, ``device``:
    the base the heads are fitted on (``--dtype``, ``--device``); int8 also certifies on it, against the float32
    full model, and writes the float32 weights (:mod:`earlyexit_kernels.integrations.int8_fit`); ``int8_layers``
    (``--layers``): where its int8 layers run, ``"auto"`` the runtime timed fastest here on training rows, recorded
    with the timings (``int8_layers`` in ``eek_fit.json``), timed on the calls of ``int8_traffic`` (``--traffic``:
    :data:`~earlyexit_kernels.engine.layers.runtime_choice.TRAFFIC`). ``overwrite``:
    replace an ``output`` that holds files (otherwise :class:`~earlyexit_kernels.training.fit_texts.FitError`).
    The report names the calibration rows by their file (``calibration.path``), as ``--calibration`` gave it.

    ``config.tries`` above 1: the model is loaded and fitted that many times, at seeds ``seed``, ``seed + 1``, ...
    (each with its own validation split where ``validation`` is None), each certified at a Bonferroni share of the
    confidence, and the try that certifies the fewest layers is written (:mod:`~earlyexit_kernels.training.fit_tries`;
    the report's ``tries`` says what each certified)."""
    from earlyexit_kernels.training.fit_config import VALIDATION_SPLIT, FitConfig, settings_of
    from earlyexit_kernels.training.fit_texts import FitError
    from earlyexit_kernels.training.fit_tries import describe_try, kept_try, try_config, try_summary

    config = settings_of(FitConfig, config, options, who="fit_folder", what="config")
    if dtype == "int8":
        from earlyexit_kernels.integrations.int8_fit import check_int8_method

        check_int8_method(config.method)
    elif int8_layers != "auto":
        raise FitError(f"--layers {int8_layers} says where the int8 layers run: give --dtype int8 with it")
    if int8_traffic != "both" and (dtype != "int8" or int8_layers != "auto"):
        raise FitError(
            f"--traffic {int8_traffic} says which calls the int8 runtimes are timed on: give --dtype int8 with it, "
            "and no --layers (which names the layers instead of timing them)"
        )
    if validation is None and config.validation_split is None:
        config = dataclasses.replace(config, validation_split=VALIDATION_SPLIT)
    rows = _Rows(train, validation, calibration, unlabelled, config.validation_split)
    if config.tries == 1:
        model, tokenizer, report, choice = _fitted(
            model_path, rows, config, dtype, device, int8_layers, traffic=int8_traffic
        )
    else:
        kept, summaries, first_choice = None, [], None
        for index in range(config.tries):
            each = try_config(config, index)
            # every try on the int8 layers the first one chose (timed once)
            layers = int8_layers if first_choice is None else _layers_of(first_choice)
            try:
                timed = first_choice is None
                fitted = _fitted(model_path, rows, each, dtype, device, layers, timed=timed, traffic=int8_traffic)
            except FitError as error:  # too few rows for the share, most likely: say where the share comes from
                raise FitError(
                    f"{error} (--tries {config.tries} certifies each try at confidence {each.confidence:.4g}, so that "
                    f"the one kept holds at {config.confidence:g}: fewer tries need fewer rows)"
                ) from None
            first_choice = first_choice or fitted[3]
            summaries.append(try_summary(fitted[2], each.seed))
            if config.progress:
                print(f"try {index + 1} of {config.tries}: {describe_try(summaries[-1])}", file=sys.stderr)
            if kept_try(summaries) == index:
                kept = fitted  # the try kept so far; the others are let go as the loop goes on
        model, tokenizer, report, kept_choice = kept
        choice = first_choice
        if choice is not None:
            # each try sets its static layers' scales on its own draw of rows: the folder serves the kept try's, on
            # which its certificate was made (the first try's choice of runtime, recorded)
            choice = dataclasses.replace(first_choice, static_layers=kept_choice.static_layers)
            if choice.exit_graph is not None:  # timed by the first try: the kept try's layers run its graph so
                from earlyexit_kernels.engine.layers.ov_static import set_exit_graph_choice

                graph = choice.exit_graph
                set_exit_graph_choice(choice.static_layers or [], graph.settings, graph.graph)
        report.tries, report.confidence = summaries, config.confidence
        if report.certificate is not None:
            # the kept try's certificate holds at the asked confidence (Bonferroni over the tries), which a later
            # eek calibrate or the server's re-certification of its one path asks for again
            report.certificate.update(confidence=config.confidence, chosen_among=config.tries)
    if calibration is not None:
        report.calibration_source = f"from {calibration.path} (--calibration)"
    save_fitted(model, tokenizer, report, Path(output), overwrite=overwrite, source=model_path, choice=choice)
    return report


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The rows of a :func:`fit_folder`: ``validation`` None is split from ``train`` at each try's seed."""

    train: object
    validation: object
    calibration: object
    unlabelled: object
    validation_split: float | None

    def split(self, seed: int) -> tuple[object, object]:
        if self.validation is not None:
            return self.train, self.validation
        from earlyexit_kernels.training.labelled_texts import split_rows

        rest, held = split_rows(len(self.train), self.validation_split, seed)
        return self.train.subset(rest), self.train.subset(held)


def _layers_of(choice) -> str:
    """The ``int8_layers`` that run ``choice``'s recipe again without timing: its runtime's key of
    :data:`~earlyexit_kernels.engine.layers.precision.INT8_LAYERS`, or ``"auto"`` (untimed: the family's recipe)."""
    from earlyexit_kernels.engine.layers.precision import INT8_LAYERS

    return next((key for key, recipe in INT8_LAYERS.items() if recipe == choice.recipe), "auto")


def _fitted(
    model_path: str,
    rows: _Rows,
    config,
    dtype: str | None,
    device: str,
    int8_layers: str,
    *,
    timed: bool = True,
    traffic: str = "both",
):
    """``(model, tokenizer, report, choice)``: ``model_path`` loaded and fitted once, at ``config``'s seed, on
    ``rows``; ``choice``: the int8 layers' :class:`~earlyexit_kernels.engine.layers.runtime_choice.LayersChoice`
    (None off int8); ``timed``: ``int8_layers`` ``"auto"`` times the runtimes (False: the family's recipe), and on
    the static int8 layers the fitted model's exit graph is timed with the plugin's options (``choice.exit_graph``;
    False: a later try, which the first try's choice covers); ``traffic``: the calls the runtimes are timed on."""
    import torch

    from earlyexit_kernels.training.fit_texts import FitError, fit_model

    train, validation = rows.split(config.seed)
    base = contextlib.nullcontext((None, None))  # (the reference, the int8 layers' choice): the model's own base
    batches = calibration = None  # training rows: the runtimes timed on these, the static layers set on those
    # The seed is set once, by fit_model: every head the fit trains is made inside it (the ones made at
    # loading never reach the folder; scripts/fit_bytes.py draws torch's generator anew before each fit). The
    # loading's draws come from a fork of torch's generator, which the caller gets back as it was.
    with torch.random.fork_rng(devices=[]):
        model, tokenizer = load_classifier(model_path)
    if dtype == "int8":
        # fitted and certified on int8, on the runtime timed fastest on training rows, written float32
        from earlyexit_kernels.engine.layers.precision import INT8_LAYERS, runnable_int8_recipe
        from earlyexit_kernels.integrations.int8_fit import calibration_batches, int8_base, timing_batches
        from earlyexit_kernels.training.fit_texts import max_length_for

        length = max_length_for(config.max_length, model, tokenizer)
        shape = {"batch_size": config.batch_size, "max_length": length, "seed": config.seed}
        if timed and int8_layers in ("auto", "openvino-static"):  # the runtimes; the static layers' exit graph
            batches = timing_batches(tokenizer, train, **shape)
        static = INT8_LAYERS["openvino-static"]
        if int8_layers == "openvino-static" or (batches and runnable_int8_recipe(static)[1] is None):
            calibration = calibration_batches(tokenizer, train, **shape)
        base = int8_base(model, device, layers=int8_layers, batches=batches, calibration=calibration, traffic=traffic)
    elif dtype is not None or device != "cpu":
        from earlyexit_kernels.engine.layers.precision import to_base

        try:
            to_base(model, dtype, device)
        except ValueError as error:
            raise FitError(str(error)) from None
    with base as (reference, choice):
        report = fit_model(
            model,
            tokenizer,
            train,
            validation,
            config,
            calibration=rows.calibration,
            unlabelled=rows.unlabelled,
            reference=reference,
        )
        if batches and calibration and getattr(model, "eek_int8_recipe", None) == INT8_LAYERS["openvino-static"]:
            from earlyexit_kernels.integrations.int8_fit import exit_graph_choice

            # on the 300 rows the layers were set on, not the 64 timing rows: a round of two batches moved by more
            # than the few percent the graph's options differ by (RT on the Intel Xeon: 7 wins of 10, 109 / 108 ms)
            choice.exit_graph = exit_graph_choice(model, calibration)  # said by eek fit beside the layers' line
    return model, tokenizer, report, choice
