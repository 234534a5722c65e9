"""How each exit method is trained, as data: the policy it is patched with and its training stages.

:func:`earlyexit_kernels.training.fit.fit_exit_heads` runs a recipe's stages in order with
:func:`earlyexit_kernels.training.train.train_exit_heads`, then calibrates the policy's threshold.
A stage names a loss of :data:`earlyexit_kernels.methods.losses.OBJECTIVES`, what it trains
and, where the default of its ``trains`` mode is not what the method needs, its learning rate
and epochs (``None``: :data:`~earlyexit_kernels.training.train.DEFAULT_LR` and
:data:`~earlyexit_kernels.training.train.DEFAULT_EPOCHS`). The joint methods start with the
head-only stage: their internal heads begin from a trained point (the cached path makes it
cost seconds) instead of from the final classifier's weights, so the joint epoch spends its
steps on the backbone. ``docs/training.md`` has each recipe's figures on the real task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from earlyexit_kernels.methods.policies import DACT, Entropy, ExitPolicy, Patience, QExit, SkipGates, Voting

__all__ = ["Stage", "Recipe", "RECIPES", "recipe"]


@dataclass(frozen=True)
class Stage:
    """One call of ``train_exit_heads``: ``objective`` (a loss name), ``trains`` (``"heads"``,
    ``"all"`` or ``"backbone"``), ``lr`` and ``epochs`` (None: the defaults of ``trains``),
    ``heads_lr`` (the internal heads' own rate when the backbone learns too; None: ``lr``) and
    ``loss_kwargs``. ``unlabelled``: the loss to use instead when the data has no labels (None:
    the stage needs labels)."""

    objective: str
    trains: str
    lr: float | None = None
    epochs: int | None = None
    loss_kwargs: dict = field(default_factory=dict)
    unlabelled: str | None = None
    heads_lr: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A method's recipe: ``policy()`` builds the policy it is patched and calibrated with (its
    threshold is then chosen by calibration), ``stages`` train it in order."""

    name: str
    policy: Callable[[], ExitPolicy]
    stages: tuple[Stage, ...]
    description: str

    def make_policy(self) -> ExitPolicy:
        return self.policy()

    @property
    def needs_labels(self) -> bool:
        return any(stage.unlabelled is None for stage in self.stages)

    @property
    def encoder_stages(self) -> tuple[Stage, ...]:
        """The stages that train the encoder too (``trains`` ``"all"`` or ``"backbone"``), in order."""
        return tuple(stage for stage in self.stages if stage.trains != "heads")


# The head-only stage every recipe starts from: cross-entropy of every internal head against
# the labels (DeeBERT's stage 2), or self-distillation from the final classifier without them.
HEADS = Stage("deebert_stage2", "heads", unlabelled="fastbert")

#: the joint recipe's rate of the warm-started heads while the backbone learns at 2e-5
JOINT_HEADS_LR = 1e-4

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "heads",
            lambda: Entropy(0.0),
            (HEADS,),
            "heads only on the frozen model (cross-entropy per head, or distillation without labels), "
            "entropy threshold",
        ),
        Recipe(
            "joint",
            lambda: Entropy(0.0),
            (HEADS, Stage("joint", "all", epochs=1, heads_lr=JOINT_HEADS_LR)),
            "heads first, then backbone and heads together for an epoch (heads at their own rate; each internal "
            "head learns the labels and the final layer's answers); entropy threshold",
        ),
        Recipe(
            "fastbert",
            lambda: Entropy(0.0),
            (Stage("fastbert", "heads", unlabelled="fastbert"),),
            "heads only, self-distillation from the final classifier (labels unused), entropy threshold",
        ),
        Recipe(
            "deebert",
            lambda: Entropy(0.0),
            (Stage("deebert_stage1", "backbone", epochs=1), HEADS),
            "stage 1 fine-tunes backbone and final classifier, stage 2 the heads on the frozen result",
        ),
        Recipe(
            "pabee",
            lambda: Patience(1),
            (HEADS, Stage("pabee", "all", epochs=1)),
            "heads first, then one joint epoch of the weighted per-layer loss; patience",
        ),
        Recipe(
            "palbert",
            lambda: QExit(0.5),
            (HEADS, Stage("palbert", "all", epochs=1)),
            "heads first, then one joint epoch of the PonderNet loss (the halting head at its own rate); q",
        ),
        Recipe(
            "ensemble",
            lambda: Voting(2),
            (HEADS, Stage("ensemble", "all", epochs=1)),
            "heads first, then one joint epoch of the ensemble loss; votes",
        ),
        Recipe(
            "dact",
            lambda: DACT(),
            (HEADS, Stage("dact", "all", epochs=1)),
            "heads first, then one joint epoch of DACT's loss (the halting head at its own rate); no knob",
        ),
        Recipe(
            "smartbert",
            lambda: SkipGates(entropy_threshold=0.0),
            (Stage("smartbert_stage1", "backbone", epochs=1), Stage("smartbert_stage2", "heads")),
            "stage 1 trains backbone and skip gates, stage 2 the heads on the frozen result; entropy threshold",
        ),
    )
}


def recipe(name: str) -> Recipe:
    """The :class:`Recipe` called ``name`` (see :data:`RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"method must be one of {', '.join(RECIPES)}; got {name!r}")
    return RECIPES[name]
