"""Training the exit heads and calibrating thresholds.

    from earlyexit_kernels.training import train_exit_heads
    train_exit_heads(model, batches, method="pabee", epochs=3)

:mod:`.train` is the training loop, :mod:`.calibration` picks thresholds from recorded
exits, :mod:`.glue` reads GLUE tasks from local files. The losses themselves are in
:mod:`earlyexit_kernels.methods.losses`; they are re-exported here.
"""

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
from earlyexit_kernels.training.train import (
    HALTING_LR,
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    freeze_backbone,
    parameter_groups,
    select_trainable,
    train_exit_heads,
)

__all__ = [
    "HALTING_LR",
    "METHODS",
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
]
