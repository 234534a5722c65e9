"""The exit heads' pooling and form, chosen on the user's data: ``fit_exit_heads(..., pooling="auto", head="auto")``.

What an exit head should read depends on the model and the task: a model pre-trained with mean
pooling (the sentence-transformers MiniLM) gives [CLS]-pooled heads of its own form that stay
near chance for several layers, where mean-pooled MLP heads are nearly as good as the last
layer. No one default is right for every model, so ``eek fit`` tries them:

1. the frozen model runs once over the training, validation and calibration rows, keeping every
   internal layer's [CLS] and masked-mean vectors (``cache_exit_inputs(..., both_poolings=True)``);
2. for each of :data:`CANDIDATES` (pooling ``cls``/``mean`` x form ``model``/``mlp``/``cascade``),
   fresh heads are trained on those vectors alone (the cached path: no model pass) until the
   validation loss stops falling; a ``cascade`` trial takes the heads of the ``mlp`` trial of its
   pooling where there was one and trains only their maps of the head below (``trains="below"``,
   from zero: it starts as those heads), which costs seconds;
3. each is calibrated on the **validation** rows (``max_drop``, uncertified), and the one that
   runs the fewest mean layers within the budget is kept (ties: the higher score).

The choice is made on the validation rows, never on the calibration rows, so a certified
calibration afterwards (``confidence=``) keeps its guarantee. Cost: one pass of the model (as
for one configuration) and the heads' training four times, plus the cascades' maps
(seconds to a minute on a CPU).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch

from earlyexit_kernels.training.cached_heads import ExitInputCache, cached_record

__all__ = [
    "AUTO",
    "CANDIDATES",
    "HeadTrial",
    "candidates_for",
    "why_not_auto",
    "inputs_for",
    "choose_heads",
    "describe_trials",
]

#: the value of ``pooling`` / ``head`` that asks for the choice
AUTO = "auto"
#: the configurations tried: (pooling, form); the cascades last, so that a tie keeps the simpler heads
CANDIDATES = (
    ("cls", "model"),
    ("cls", "mlp"),
    ("mean", "model"),
    ("mean", "mlp"),
    ("cls", "cascade"),
    ("mean", "cascade"),
)


@dataclass
class HeadTrial:
    """One configuration tried: its validation score and mean layers at the budget, per-layer
    scores (the head of layer k alone), training epochs and seconds."""

    pooling: str
    head: str
    accuracy: float
    mean_layers: float
    layer_scores: list[float]
    epochs: int
    seconds: float
    chosen: bool = False


def candidates_for(pooling: str | None, head: str | None) -> tuple[tuple[str, str], ...]:
    """The configurations to try when ``pooling`` or ``head`` is :data:`AUTO` (the other one fixed, if given)."""
    return (
        tuple((p, h) for p, h in CANDIDATES if pooling in (AUTO, None, p) and head in (AUTO, None, h))
        if AUTO in (pooling, head)
        else ()
    )


def why_not_auto(first_stage_trains: str, policy) -> str | None:
    """Why the choice cannot be made for a recipe (None: it can): it is made on the head-only
    stage, from cached vectors, for heads that read nothing else."""
    from earlyexit_kernels.methods.policies import SkipGates

    if first_stage_trains != "heads":
        return "its first stage trains the backbone, which changes what the heads read"
    if policy.needs_halting_head or isinstance(policy, SkipGates):
        return f"{type(policy).__name__} has a halting head or gates that read the same vectors"
    return None


def inputs_for(model, cache: ExitInputCache, pooling: str, head: str) -> ExitInputCache:
    """The cache of what heads of ``pooling`` and form ``head`` read, from a cache with both poolings.

    The ``"model"`` form reads the model's own (frozen) pooler over the pooled vector; layer L
    keeps the model's own input.
    """
    from earlyexit_kernels.patching.patch import current_adapter

    if cache.pooled is None:
        raise ValueError("the cache has one pooling only: make it with cache_exit_inputs(..., both_poolings=True)")
    vectors = cache.pooled[pooling]
    if head == "model":
        adapter = current_adapter(model)
        with torch.no_grad():
            rows, layers, width = vectors.shape
            vectors = adapter.pool_vector(vectors.reshape(rows * layers, width)).reshape(rows, layers, -1)
    inputs = torch.cat([vectors.to(cache.inputs.dtype), cache.inputs[:, -1:]], dim=1)
    return dataclasses.replace(cache, inputs=inputs, pooled=None)


def choose_heads(
    model,
    policy,
    train: ExitInputCache,
    validation: ExitInputCache,
    *,
    candidates=CANDIDATES,
    train_heads,
    max_drop: float | None,
    target_layers: float | None,
    target: str,
) -> tuple[HeadTrial, list[HeadTrial], object]:
    """Train fresh heads of every configuration of ``candidates`` on the cached vectors and keep the best.

    ``train_heads(cache, val_cache, trains=None) -> TrainingLog`` trains the model's current heads
    (the caller's stage settings; ``trains="below"``: the cascade's maps alone). Returns
    ``(chosen, trials, log)``: the model is left patched with the chosen configuration and its
    trained heads, ``log`` is the chosen heads' training log.
    """
    from earlyexit_kernels.patching.patch import current_adapter, patch
    from earlyexit_kernels.training.calibration import calibrate

    trials, states, logs = [], [], []
    for pooling, head in candidates:
        patch(model, policy, pooling=pooling, head=head)
        heads = model.early_exit_heads
        heads.set_form(head, None, current_adapter(model).final_classifier)  # fresh heads for every trial
        started = time.perf_counter()
        start_from = _mlp_trial(trials, pooling) if head == "cascade" else None
        train_cache, val_cache = inputs_for(model, train, pooling, head), inputs_for(model, validation, pooling, head)
        if start_from is not None:  # the MLPs of that trial, as they ended; only the maps B_i (from 0) learn
            heads.classifiers.load_state_dict(states[start_from], strict=False)
            log = train_heads(train_cache, val_cache, trains="below")
        else:
            log = train_heads(train_cache, val_cache)
        seconds = time.perf_counter() - started
        model.eval()
        record = cached_record(model, val_cache)
        with warnings.catch_warnings():  # a trial that saves little is a row of the table, not a warning
            warnings.simplefilter("ignore")
            result = calibrate(record, max_drop=max_drop, target_layers=target_layers, target=target, min_saving=0.0)
        trials.append(
            HeadTrial(
                pooling, head, result.accuracy, result.mean_layers, list(result.layer_scores), log.epochs_run, seconds
            )
        )
        states.append({k: v.detach().clone() for k, v in heads.classifiers.state_dict().items()})
        logs.append(log)
    if max_drop is not None:
        best = min(range(len(trials)), key=lambda i: (trials[i].mean_layers, -trials[i].accuracy))
    else:
        best = max(range(len(trials)), key=lambda i: (trials[i].accuracy, -trials[i].mean_layers))
    chosen = trials[best]
    chosen.chosen = True
    patch(model, policy, pooling=chosen.pooling, head=chosen.head)
    heads = model.early_exit_heads
    heads.set_form(chosen.head, None, current_adapter(model).final_classifier)
    heads.classifiers.load_state_dict(states[best])
    return chosen, trials, logs[best]


def _mlp_trial(trials: list[HeadTrial], pooling: str) -> int | None:
    """The index of the ``mlp`` trial of ``pooling`` among ``trials``, or None."""
    return next((i for i, t in enumerate(trials) if (t.pooling, t.head) == (pooling, "mlp")), None)


def describe_trials(trials: list[HeadTrial], measure: str, num_layers: int) -> list[str]:
    """The compact table ``eek fit`` prints: one line per configuration, the chosen one marked."""
    lines = [f"heads tried (pooling, form; {measure} on validation at the budget, per-layer {measure}, training):"]
    for t in trials:
        layers = " ".join(f"{100 * a:.0f}" for a in t.layer_scores[:-1])
        lines.append(
            f"  {'*' if t.chosen else ' '} {t.pooling:<4} {t.head:<7}  {t.mean_layers:4.2f} of {num_layers} layers "
            f"at {100 * t.accuracy:5.2f}%  layers 1-{num_layers - 1}: {layers}  ({t.epochs} epochs, {t.seconds:.1f} s)"
        )
    return lines
