"""Exit heads fitted on the int8 base they are served on (``eek fit --dtype int8``).

A head reads the hidden states of the layer below it. Fitted on the float32 model and served on
the int8 base (``eek calibrate --dtype int8``, then ``eek serve --dtype int8``), it reads other
hidden states than it learnt from, and its threshold pays for that in layers. Here the model's
encoder layers run int8 (the family's recipe, :func:`~earlyexit_kernels.engine.layers.precision.to_base`)
while the heads train on their hidden states (the cached path: one int8 pass over the rows), and
the threshold is certified on that base against the saved float32 full model, the one the user
validated: accuracy lost against it where the rows have labels, else disagreement with it. The
int8 base's own changes and the exits' count together against one budget, as ``eek calibrate
--dtype int8`` certifies by default.

The folder keeps the float32 weights, as every folder does: the float32 layers are put back
before it is written, and the int8 base is made from them again at loading, with the recipe the
certificate holds for recorded in ``eek_fit.json`` (``base``, ``int8_recipe``).

Which runtime runs the int8 layers is measured on the fitting CPU (``--layers auto``): the installed runtimes
are timed on a few training rows, in batches and one at a time
(:mod:`~earlyexit_kernels.engine.layers.runtime_choice`), the family's kept unless another is faster on both in
enough rounds for a sign test, and the choice recorded with the CPU class and the timings (``int8_layers``);
``--layers`` names one instead.

Only head-only recipes (``heads``, ``fastbert``): the int8 layers learn nothing.
"""

from __future__ import annotations

import contextlib
import copy

__all__ = [
    "TIMING_ROWS",
    "CALIBRATION_ROWS",
    "int8_base",
    "check_int8_method",
    "timing_batches",
    "calibration_batches",
    "exit_graph_choice",
]


def check_int8_method(method: str) -> None:
    """A :class:`~earlyexit_kernels.training.fit_config.FitError` saying what to run instead where
    ``method``'s recipe trains the encoder, which the int8 layers cannot learn."""
    from earlyexit_kernels.training.fit_config import FitError
    from earlyexit_kernels.training.recipes import recipe

    stages = recipe(method).encoder_stages
    if stages:
        raise FitError(
            f"--dtype int8 fits the exit heads on the frozen int8 encoder; --method {method} trains the encoder too "
            f"({stages[0].objective}), which its int8 layers cannot learn. Fit --method heads or fastbert on int8, "
            f"or fit {method} on float32 and certify it on int8 with eek calibrate OUTPUT_DIR FILE --dtype int8"
        )


#: how many of the training rows the static int8 layers set their scales on (``--layers auto`` where OpenVINO and
#: NNCF are installed, or ``--layers openvino-static``): optimum-intel's and Sentence Transformers' default
#: calibration subset for OpenVINO's static int8
CALIBRATION_ROWS = 300

#: how many of the training rows the int8 runtimes are timed on (``eek fit --dtype int8 --layers auto``): a few
#: seconds per runtime on a MiniLM at one thread, small beside the fit
TIMING_ROWS = 64


def _training_batches(tokenizer, train, count: int, *, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """Up to ``count`` of the training rows ``train``, the first of one draw with ``seed``, tokenized into the
    length-sorted batches every engine runs. Training rows, never the rows that certify: what is chosen or set on
    them depends on what they showed."""
    import torch

    from earlyexit_kernels.training.labelled_texts import encode, length_sorted_batches

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return length_sorted_batches(encode(tokenizer, train.subset(order[:count]), max_length), None, batch_size)


def timing_batches(tokenizer, train, *, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """Up to :data:`TIMING_ROWS` of the training rows (:func:`_training_batches`): what the int8 runtimes are
    timed on."""
    return _training_batches(tokenizer, train, TIMING_ROWS, batch_size=batch_size, max_length=max_length, seed=seed)


def calibration_batches(tokenizer, train, *, batch_size: int, max_length: int, seed: int) -> list[dict]:
    """Up to :data:`CALIBRATION_ROWS` of the training rows (:func:`_training_batches`, the same draw as
    :func:`timing_batches`, whose rows are among them): what the static int8 layers set their scales on."""
    return _training_batches(
        tokenizer, train, CALIBRATION_ROWS, batch_size=batch_size, max_length=max_length, seed=seed
    )


@contextlib.contextmanager
def int8_base(
    model,
    device: str = "cpu",
    *,
    layers: str = "auto",
    batches: list[dict] | None = None,
    calibration: list[dict] | None = None,
    traffic: str = "both",
):
    """``model``'s encoder layers int8 inside the block, its float32 layers put back after, whatever happens.

    Yields ``(reference, choice)``: a copy of ``model`` as it was (float32, patched), whose full depth the
    certificate measures against, and the
    :class:`~earlyexit_kernels.engine.layers.runtime_choice.LayersChoice` of the int8 layers that run: with
    ``layers`` ``"auto"`` and ``batches`` (:func:`timing_batches`), the installed runtime that was fastest on
    them (:func:`~earlyexit_kernels.engine.layers.runtime_choice.choose_int8_layers`, on the calls of ``traffic``:
    :data:`~earlyexit_kernels.engine.layers.runtime_choice.TRAFFIC`); ``"auto"`` without
    batches, the family's recipe (:func:`~earlyexit_kernels.engine.layers.precision.int8_recipe`); a key of
    :data:`~earlyexit_kernels.engine.layers.precision.INT8_LAYERS`, those layers. ``calibration``
    (:func:`calibration_batches`): the rows static int8 layers set their scales on; without it static int8 is no
    candidate, and ``--layers openvino-static`` is refused. Where static int8 layers run, the choice keeps them
    (``choice.static_layers``) after the float32 layers are put back, for the folder to save. ``model`` must be float32
    and have an ``encoder.layer`` list, which int8 swaps; a
    :class:`~earlyexit_kernels.training.fit_config.FitError` says what runs instead otherwise."""
    import torch

    from earlyexit_kernels.engine.layers.ort_layer import encoder_layers
    from earlyexit_kernels.engine.layers.precision import CALIBRATED_RECIPES, int8_recipe, int8_recipe_on, to_base
    from earlyexit_kernels.engine.layers.runtime_choice import LayersChoice, choose_int8_layers
    from earlyexit_kernels.training.fit_config import FitError

    layer_list = encoder_layers(model)
    if layer_list is None:
        raise FitError(
            f"--dtype int8 fits the heads on {type(model).__name__}'s int8 encoder layers, and it has no encoder.layer "
            "list: fit on float32 and certify on int8 with eek calibrate OUTPUT_DIR FILE --dtype int8"
        )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        kinds = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        raise FitError(
            f"--dtype int8 fits on the int8 base made from the float32 model, and certifies against that model; "
            f"this one is saved in {', '.join(kinds)}: save it in float32 first (model.float().save_pretrained(...))"
        )
    try:
        default = int8_recipe(model)
        recipe = int8_recipe_on(model, layers)
    except ValueError as error:
        raise FitError(str(error)) from None
    if recipe in CALIBRATED_RECIPES and not calibration:
        raise FitError(f"--layers {layers} sets its scales on training rows: none were given")
    reference = copy.deepcopy(model)  # its layers are the float32 ones put back
    if layers != "auto":
        choice = LayersChoice(recipe, default, f"int8 layers: {layers}, as --layers asked", by="asked")
    elif batches:
        choice = choose_int8_layers(
            model, batches, default=default, reference=reference, calibration=calibration, traffic=traffic
        )
    else:
        choice = LayersChoice(
            default, default, f"int8 layers: the family's recipe {default} (nothing timed)", by="family"
        )
    try:
        try:
            to_base(model, "int8", device, int8_recipe=choice.recipe, calibration=calibration)
        except ValueError as error:
            raise FitError(str(error)) from None
        yield reference, choice
    finally:
        if getattr(model, "eek_int8_recipe", None) in CALIBRATED_RECIPES:
            choice.static_layers = list(encoder_layers(model))  # what the folder saves: they cannot be made again
        for index, layer in enumerate(encoder_layers(reference)):
            layer_list[index] = layer
        if hasattr(model, "eek_int8_recipe"):
            del model.eek_int8_recipe


def exit_graph_choice(model, batches: list[dict]):
    """``model``'s exit graph (patched, on the static int8 layers) compiled from now on with the settings timed
    fastest on ``batches`` on this CPU, or no graph where its layers one call each were faster
    (:func:`~earlyexit_kernels.engine.layers.runtime_choice.choose_exit_graph_settings`; the layers carry the choice
    into a folder); the :class:`~earlyexit_kernels.engine.layers.runtime_choice.GraphSettingsChoice`, whose reason
    ``eek fit`` prints."""
    from earlyexit_kernels.engine.layers.runtime_choice import choose_exit_graph_settings, use_exit_graph_settings
    from earlyexit_kernels.engine.step.ov_exit_graph import exit_graph
    from earlyexit_kernels.patching.patch import current_adapter, policy_of

    def graph_of(fitted):
        return exit_graph(fitted, current_adapter(fitted), fitted.early_exit_heads, policy_of(fitted))

    chosen = choose_exit_graph_settings(model, batches, graph_of)
    use_exit_graph_settings(model, chosen.settings, chosen.graph)
    return chosen
