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

A cascade is nested on the MLP heads it was built on, so on the same rows the two differ by
little and a raw comparison would keep it on noise (measured: MiniLM-L6 on Rotten Tomatoes kept it
at 2.573 against 2.597 validation layers, and the fit then certified 3.53 of 6 on test where the
MLP heads had certified 2.88: the walk's path changed with the heads). It is
kept only where it beats them in at least :data:`CASCADE_CONFIDENCE` of paired bootstrap resamples
of the validation rows (:func:`saving_share`, on the global entropy grid).

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
    "CASCADE_CONFIDENCE",
    "HeadTrial",
    "candidates_for",
    "why_not_auto",
    "inputs_for",
    "choose_heads",
    "describe_trials",
    "saving_share",
]

#: a cascade is kept over the MLP heads it was built on only where it does better in at least this
#: share of paired resamples of the validation rows (one-sided: its saving is past their noise)
CASCADE_CONFIDENCE = 0.95
#: the paired bootstrap resamples :func:`saving_share` draws
CASCADE_RESAMPLES = 1000
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
    #: a cascade built on an ``mlp`` trial: the share of paired resamples in which it did better
    beats_base: float | None = None


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
    from earlyexit_kernels.calibration.select import Goal
    from earlyexit_kernels.patching.patch import current_adapter, patch
    from earlyexit_kernels.training.calibrate_model import calibrate

    # each trial's point, uncertified, at the target asked (a trial that saves little is still a row)
    trial_goal = Goal(max_drop=max_drop, target_layers=target_layers, target=target, min_saving=0.0)
    trials, states, logs, records = [], [], [], []
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
        records.append(record)
        with warnings.catch_warnings():  # a trial that saves little is a row of the table, not a warning
            warnings.simplefilter("ignore")
            result = calibrate(record, goal=trial_goal)
        trials.append(
            HeadTrial(
                pooling, head, result.accuracy, result.mean_layers, list(result.layer_scores), log.epochs_run, seconds
            )
        )
        if start_from is not None:
            trials[-1].beats_base = saving_share(
                records[start_from], record, max_drop=max_drop, target_layers=target_layers, target=target
            )
        states.append({k: v.detach().clone() for k, v in heads.classifiers.state_dict().items()})
        logs.append(log)
    eligible = [i for i, t in enumerate(trials) if t.beats_base is None or t.beats_base >= CASCADE_CONFIDENCE]
    if max_drop is not None:
        best = min(eligible, key=lambda i: (trials[i].mean_layers, -trials[i].accuracy))
    else:
        best = max(eligible, key=lambda i: (trials[i].accuracy, -trials[i].mean_layers))
    chosen = trials[best]
    chosen.chosen = True
    patch(model, policy, pooling=chosen.pooling, head=chosen.head)
    heads = model.early_exit_heads
    heads.set_form(chosen.head, None, current_adapter(model).final_classifier)
    heads.classifiers.load_state_dict(states[best])
    return chosen, trials, logs[best]


def saving_share(
    base,
    other,
    *,
    max_drop: float | None,
    target_layers: float | None,
    target: str,
    resamples: int = CASCADE_RESAMPLES,
    seed: int = 0,
) -> float:
    """The share of paired bootstrap resamples of the rows in which ``other`` (an ``ExitRecord``)
    does better than ``base`` (one of the same rows) on the global entropy grid: fewer mean layers
    within ``max_drop`` points of the full model (or, with ``target_layers``, a higher score within
    that many mean layers). Each resample draws the rows with replacement, the same rows for both."""
    from earlyexit_kernels.calibration.candidates import certified_candidates
    from earlyexit_kernels.calibration.record import is_multi_label_record, references, replay
    from earlyexit_kernels.methods.policies import Entropy

    grid = certified_candidates(Entropy(0.0), base.num_layers, base.all_logits.shape[-1])
    rows = base.all_logits.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros(resamples, rows)
    weights.scatter_add_(1, torch.randint(rows, (resamples, rows), generator=generator), torch.ones(resamples, rows))
    weights /= rows

    def right(logits, reference):
        if is_multi_label_record(base):
            return ((logits.float() > 0).float() == reference).all(-1).float()
        return (logits.float().argmax(-1) == reference).float()

    def best(record) -> torch.Tensor:
        reference = references(record, target)
        outs = [replay(policy, record) for policy in grid]
        layers = weights @ torch.stack([o.layers_run.float() for o in outs]).T  # [resamples, candidates]
        scores = weights @ torch.stack([right(o.logits, reference) for o in outs]).T
        if max_drop is not None:
            full = weights @ right(record.all_logits[-1], reference)
            within = scores >= full[:, None] - max_drop / 100 - 1e-12
            return torch.where(within, layers, float(record.num_layers)).min(1).values
        return torch.where(layers <= target_layers + 1e-9, scores, -1.0).max(1).values

    if max_drop is not None:
        return float((best(other) < best(base)).double().mean())
    return float((best(other) > best(base)).double().mean())


def _mlp_trial(trials: list[HeadTrial], pooling: str) -> int | None:
    """The index of the ``mlp`` trial of ``pooling`` among ``trials``, or None."""
    return next((i for i, t in enumerate(trials) if (t.pooling, t.head) == (pooling, "mlp")), None)


def describe_trials(trials: list[HeadTrial], measure: str, num_layers: int) -> list[str]:
    """The compact table ``eek fit`` prints: one line per configuration, the chosen one marked."""
    lines = [f"heads tried (pooling, form; {measure} on validation at the budget, per-layer {measure}, training):"]
    for t in trials:
        layers = " ".join(f"{100 * a:.0f}" for a in t.layer_scores[:-1])
        beats = ""
        if t.beats_base is not None:
            kept = "" if t.beats_base >= CASCADE_CONFIDENCE else f", under {100 * CASCADE_CONFIDENCE:.0f}%: not kept"
            beats = f"; better than its mlp heads in {100 * t.beats_base:.0f}% of resamples{kept}"
        lines.append(
            f"  {'*' if t.chosen else ' '} {t.pooling:<4} {t.head:<7}  {t.mean_layers:4.2f} of {num_layers} layers "
            f"at {100 * t.accuracy:5.2f}%  layers 1-{num_layers - 1}: {layers}  ({t.epochs} epochs, {t.seconds:.1f} s"
            f"{beats})"
        )
    return lines
