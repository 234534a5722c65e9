"""Training the exit heads and calibrating thresholds.

    from earlyexit_kernels.training import fit_exit_heads, train_exit_heads
    result = fit_exit_heads(model, train_batches, val_batches, method="heads", max_drop=1.0)
    train_exit_heads(model, batches, method="pabee", epochs=3)

:mod:`.fit` trains with a method's recipe (:mod:`.recipes`), calibrates and patches;
:mod:`.fit_texts` is ``eek fit`` as a library (texts in, via :mod:`.labelled_texts`);
:mod:`.train` is the training loop, :mod:`.cached_heads` its fast path for head-only
training, :mod:`.calibrate_model` runs every head once on some rows and picks
thresholds from them (:mod:`.calibrate_texts`: the same from texts), :mod:`.glue` reads GLUE tasks from local files. What is chosen and
certified from the recorded logits is :mod:`earlyexit_kernels.calibration` (tensor code, no
model). The losses themselves are in :mod:`earlyexit_kernels.methods.losses`; they are
re-exported here.
"""

from earlyexit_kernels._method_names import METHODS, UNLABELLED_METHODS
from earlyexit_kernels.methods.losses import (
    dact_loss,
    deebert_stage1_loss,
    deebert_stage2_loss,
    ensemble_loss,
    fastbert_loss,
    pabee_loss,
    per_layer_loss,
    per_sample_loss,
    pondernet_loss,
    smartbert_stage1_loss,
    smartbert_stage2_loss,
)
from earlyexit_kernels.training.cached_heads import ExitInputCache, cache_exit_inputs, cached_exits, cached_record
from earlyexit_kernels.training.fit import (
    FitResult,
    HeadBatches,
    HeadsFit,
    StageResult,
    fit_exit_heads,
    fit_heads,
    split_validation,
)
from earlyexit_kernels.training.fit_config import Training, TrainSettings
from earlyexit_kernels.training.recipes import RECIPES, Recipe, Stage, recipe
from earlyexit_kernels.training.train import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    HALTING_LR,
    OBJECTIVE_NAMES,
    OPTIMIZERS,
    SCHEDULES,
    TrainingLog,
    default_lr,
    freeze_backbone,
    parameter_groups,
    select_trainable,
    train_exit_heads,
)

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "ExitInputCache",
    "FitResult",
    "HeadBatches",
    "HeadsFit",
    "RECIPES",
    "Recipe",
    "Stage",
    "StageResult",
    "Training",
    "TrainingLog",
    "cache_exit_inputs",
    "cached_exits",
    "cached_record",
    "default_lr",
    "fit_exit_heads",
    "fit_heads",
    "recipe",
    "split_validation",
    "HALTING_LR",
    "METHODS",
    "UNLABELLED_METHODS",
    "OBJECTIVE_NAMES",
    "OPTIMIZERS",
    "SCHEDULES",
    "dact_loss",
    "deebert_stage1_loss",
    "deebert_stage2_loss",
    "ensemble_loss",
    "fastbert_loss",
    "freeze_backbone",
    "pabee_loss",
    "parameter_groups",
    "per_layer_loss",
    "per_sample_loss",
    "pondernet_loss",
    "select_trainable",
    "smartbert_stage1_loss",
    "smartbert_stage2_loss",
    "train_exit_heads",
    "TrainSettings",
]
