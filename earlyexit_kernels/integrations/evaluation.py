"""How well and how fast a patched model classifies a labelled (or unlabelled) set: ``eek evaluate``.

    batches = length_sorted_batches(encoded, labels, batch_size=32)
    result = evaluate(model, batches, full_model=eek.unpatch(copy.deepcopy(model)))
    print(result.summary())

The patched model runs batch by batch (its per-batch early exit); with ``full_model`` (the
same weights, unpatched) each batch also runs through it right after, so both are timed on
the same length-sorted batches, interleaved, under the same conditions. Accuracy needs
labels; agreement (the fraction of sequences whose prediction equals the full model's)
needs ``full_model``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from earlyexit_kernels.methods.policies import DACT, Voting
from earlyexit_kernels.patching.patch import policy_of
from earlyexit_kernels.patching.state import is_patched

__all__ = ["Evaluation", "evaluate", "histogram_lines"]


@dataclass
class Evaluation:
    """What :func:`evaluate` measured on N sequences of a model with L layers.

    ``accuracy`` / ``full_accuracy``: fractions (None without labels, or without the full
    model). ``agreement``: fraction of predictions equal to the full model's (None without
    it). ``mean_layers``: mean layers run; ``exit_counts`` [L]: sequences leaving after each
    layer. ``seconds`` / ``full_seconds``: wall-clock of the timed passes.
    ``full_depth_max_diff``: largest absolute difference between the logits of sequences
    that ran every layer and the full model's (0.0: bit-exact; None when none ran every
    layer, without the full model, or under ``Voting`` and ``DACT``, whose answer at the last
    layer combines every layer's head).
    """

    count: int
    num_layers: int
    mean_layers: float
    exit_counts: list[int]
    seconds: float
    accuracy: float | None = None
    full_accuracy: float | None = None
    agreement: float | None = None
    full_seconds: float | None = None
    full_depth_max_diff: float | None = None
    predictions: torch.Tensor = field(default=None, repr=False)

    @property
    def sequences_per_second(self) -> float:
        return self.count / max(self.seconds, 1e-12)

    @property
    def full_sequences_per_second(self) -> float | None:
        return None if self.full_seconds is None else self.count / max(self.full_seconds, 1e-12)

    @property
    def ideal_speedup(self) -> float:
        """What the layers alone allow: L / mean layers run."""
        return self.num_layers / self.mean_layers

    @property
    def speedup(self) -> float | None:
        """Full model's time / early exit's time, on the same batches."""
        return None if self.full_seconds is None else self.full_seconds / max(self.seconds, 1e-12)

    def summary(self) -> list[str]:
        """The lines ``eek evaluate`` prints."""
        lines = [f"sequences: {self.count}"]
        if self.accuracy is not None:
            full = "" if self.full_accuracy is None else f" (full model {100 * self.full_accuracy:.2f}%)"
            lines.append(f"accuracy: {100 * self.accuracy:.2f}%{full}")
        if self.agreement is not None:
            lines.append(f"agreement with the full model: {100 * self.agreement:.2f}%")
        lines.append(
            f"mean layers run: {self.mean_layers:.2f} of {self.num_layers} (ideal speed-up {self.ideal_speedup:.2f}x)"
        )
        lines.append("exit layer histogram:")
        lines += ["  " + line for line in histogram_lines(self.exit_counts)]
        lines.append(f"early exit: {self.sequences_per_second:.1f} sequences/s ({self.seconds:.2f} s)")
        if self.full_seconds is not None:
            lines.append(
                f"full model, same batches: {self.full_sequences_per_second:.1f} sequences/s "
                f"({self.full_seconds:.2f} s); speed-up {self.speedup:.2f}x of the ideal {self.ideal_speedup:.2f}x"
            )
        if self.full_depth_max_diff is not None:
            exact = "bit-exact" if self.full_depth_max_diff == 0 else f"max |diff| {self.full_depth_max_diff:.3g}"
            lines.append(f"logits of the sequences that ran every layer vs the full model: {exact}")
        return lines


def histogram_lines(counts: list[int], width: int = 40) -> list[str]:
    """One line per layer: ``layer k  count  share  bar``."""
    total = max(sum(counts), 1)
    top = max(max(counts), 1)
    return [
        f"layer {k:>2}: {n:>7} {100 * n / total:5.1f}% {'#' * round(width * n / top)}"
        for k, n in enumerate(counts, start=1)
    ]


def _inputs(batch: dict, device) -> dict:
    return {
        name: batch[name].to(device)
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if batch.get(name) is not None
    }


@torch.no_grad()
def evaluate(model, batches: list[dict], *, full_model=None, progress: bool = False) -> Evaluation:
    """Run the patched ``model`` (and ``full_model``, interleaved) over ``batches``; see :class:`Evaluation`.

    ``batches``: dicts with ``input_ids``, ``attention_mask``, optionally ``token_type_ids``,
    ``labels`` [n] and ``rows`` [n] (positions in the data: predictions come back in that
    order). Each model first runs the first batch once, untimed (warm-up).
    """
    if not batches:
        raise ValueError("evaluate needs at least one batch")
    device = next(model.parameters()).device
    num_layers = model.config.num_hidden_layers
    count = sum(int(b["input_ids"].shape[0]) for b in batches)
    model.eval()
    if full_model is not None:
        full_model.eval()
    model(**_inputs(batches[0], device))
    if full_model is not None:
        full_model(**_inputs(batches[0], device))
    seconds = full_seconds = 0.0
    predictions = torch.empty(count, dtype=torch.long)
    full_predictions = torch.empty(count, dtype=torch.long)
    labels = torch.full((count,), -1, dtype=torch.long)
    exits = torch.zeros(count, dtype=torch.long)
    layers_run = torch.zeros(count, dtype=torch.long)
    max_diff, any_full_depth = 0.0, False
    # Voting and DACT answer at the last layer with a combination of every layer's head: no
    # logits of the unpatched model to compare with.
    comparable = not (is_patched(model) and isinstance(policy_of(model), (Voting, DACT)))
    from tqdm.auto import tqdm

    bar = tqdm(total=count, desc="evaluating", unit="seq", disable=None if progress else True, leave=False)
    offset = 0
    for batch in batches:
        n = int(batch["input_ids"].shape[0])
        rows = batch["rows"] if batch.get("rows") is not None else torch.arange(offset, offset + n)
        offset += n
        inputs = _inputs(batch, device)
        start = time.perf_counter()
        out = model(**inputs)
        _sync(device)
        seconds += time.perf_counter() - start
        predictions[rows] = out.logits.float().argmax(-1).cpu()
        exits[rows] = out.exit_layer.cpu()
        layers_run[rows] = out.layers_run.cpu()
        if batch.get("labels") is not None:
            labels[rows] = batch["labels"]
        if full_model is not None:
            start = time.perf_counter()
            full = full_model(**inputs).logits
            _sync(device)
            full_seconds += time.perf_counter() - start
            full_predictions[rows] = full.float().argmax(-1).cpu()
            deep = ((out.exit_layer == num_layers) & (out.layers_run == num_layers)).to(full.device)
            if comparable and deep.any():
                any_full_depth = True
                max_diff = max(max_diff, float((out.logits[deep].float() - full[deep].float()).abs().max()))
        bar.update(n)
    bar.close()
    labelled = bool((labels >= 0).all())
    result = Evaluation(
        count=count,
        num_layers=num_layers,
        mean_layers=float(layers_run.float().mean()),
        exit_counts=torch.bincount(exits - 1, minlength=num_layers).tolist(),
        seconds=seconds,
        predictions=predictions,
    )
    if labelled:
        result.accuracy = float((predictions == labels).float().mean())
    if full_model is not None:
        result.full_seconds = full_seconds
        result.agreement = float((predictions == full_predictions).float().mean())
        if labelled:
            result.full_accuracy = float((full_predictions == labels).float().mean())
        if any_full_depth:
            result.full_depth_max_diff = max_diff
    return result


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
