"""The batched early-exit loop: each sequence leaves on its own, the batch shrinks on the device.

Per layer: run it on the active rows only; compute the exit heads on what they read
(the adapter's ``exit_input``: [CLS] row or masked mean); apply the policy and write each exiting row's logits, exit layer and layers
run at its original position (the backend's ``exit_step_write_back``, one fused
launch where the backend has it); then compact hidden states, 2-D mask, policy
state and the index map (stable order) and trim the padding no active row needs.
The decisions stay on the device; the only host read-back is the number of
survivors with the longest extent, at most once per layer and never on a layer
where the policy cannot exit.

The engine is model-agnostic: it drives an :class:`EncoderAdapter` (one per Hugging Face
family in :mod:`earlyexit_kernels.models`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from earlyexit_kernels.backends.compaction import survivor_index, trim, valid_extent
from earlyexit_kernels.backends.registry import Backend
from earlyexit_kernels.backends.write_back import WriteBack, write_back
from earlyexit_kernels.engine.layers.module_weights import fusable_head_weights
from earlyexit_kernels.engine.step.heads import ExitHeads
from earlyexit_kernels.engine.step.start_state import BELOW, start_state
from earlyexit_kernels.methods.exit_rules import can_exit_before_last, needs_head_when_none_can_exit
from earlyexit_kernels.methods.policies import ExitPolicy, Scheduled, SkipGates

__all__ = [
    "EncoderAdapter",
    "ExitResult",
    "can_fuse_head",
    "head_and_exit_step",
    "settle_exits",
    "heads_run_where_none_exit",
    "run_early_exit",
    "trimmed_inputs",
]


class EncoderAdapter(Protocol):
    """What the engine needs from an encoder classifier."""

    num_layers: int
    num_labels: int
    hidden_size: int
    attn_implementation: str

    def layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype):
        """What ``run_layer`` takes as its mask, built from the 2-D mask [n, S] or None (no padding).

        Called again after every compaction or trimming of the batch."""

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
        """Encoder layer ``index`` (0-based) on ``hidden`` [n, S, H] with the mask of ``layer_mask``."""

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The model's own pooler: [n, S, H] (with the 2-D mask [n, S] or None) -> [n, H].

        [CLS] families read row 0 only; a mean pooling averages the valid tokens."""

    def exit_input(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What the head of 1-based ``layer`` reads: [n, S, H] (2-D mask [n, S] or None) -> [n, H].

        ``pool`` at layer L; before it the chosen pooling, then the model's pooler for ``head="model"``."""

    def classify(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        """The head of 1-based ``layer`` on its ``exit_input``: [n, H] -> [n, C]."""


@dataclass
class ExitResult:
    """What the loop produced for a batch of B sequences (shapes in the field comments)."""

    logits: torch.Tensor  # [B, C], model dtype
    exit_layer: torch.Tensor  # [B] int64, 1..L
    layers_run: torch.Tensor  # [B] int64
    all_logits: torch.Tensor | None = None  # [L, B, C] with all_exits
    all_halting: torch.Tensor | None = None  # [L, B] halting probabilities (QExit, DACT)
    all_skipped: torch.Tensor | None = None  # [L, B] bool (SkipGates)
    all_halting_logits: torch.Tensor | None = None  # [L, B] float32, the halting head's logits before the sigmoid
    all_gates: torch.Tensor | None = None  # [L, B] float32 gate probabilities (SkipGates; 0 on layers 1 and L)
    host_syncs: int = 0


def scheduled_exit_counts(policy: ExitPolicy, num_layers: int) -> tuple[list[int] | None, int]:
    """``(counts, read-backs)``: ``Scheduled``'s count of rows leaving at each layer (index 0..L),
    else None, and whether this call read the device to get them (0 or 1). Read back once
    per schedule and kept on the policy while its tensor's storage and version stay the same: a
    read-back every forward would drain the GPU's queue before the layers, a cost no threshold
    policy has (the benchmarks time ``Scheduled`` as a stand-in for them)."""
    if not isinstance(policy, Scheduled):
        return None, 0
    layers = policy.exit_layers
    try:
        key = (layers.data_ptr(), layers._version, layers.device, num_layers)
    except RuntimeError:  # an inference tensor has no version counter: read it every time
        key = None
    kept = getattr(policy, "_exit_counts", None)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1], 0
    counts = torch.bincount(layers.cpu(), minlength=num_layers + 1).tolist()
    if key is not None:
        object.__setattr__(policy, "_exit_counts", (key, counts))
    return counts, 1


def run_early_exit(
    adapter: EncoderAdapter,
    heads: ExitHeads,
    policy: ExitPolicy,
    backend: Backend,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    all_exits: bool = False,
    train_gates: bool = False,
    mask_summary: tuple[torch.Tensor, int, int] | None = None,
) -> ExitResult:
    """Run the encoder layers with early exit on ``hidden`` [B, S, H] (the embeddings).

    ``mask_summary``: ``(mask_extents(mask), longest, padded)`` when the caller has read the
    two numbers back already (with its own checks, in one read-back); else the engine reads
    them (``longest``: the largest extent, ``padded``: masked positions).

    ``mask`` is the 2-D attention mask [B, S] or None for no padding. With
    ``all_exits=True`` nothing is compacted: every layer runs on every row, every head
    is recorded, and the outputs are what the policy decides from them.

    ``train_gates=True`` (with ``all_exits``; SmartBERT's stage 1, training only) mixes
    each gated layer as ``(1 - g') * Layer(h) + g' * h`` with the straight-through hard
    gate ``g' = g + (1[g >= r] - g).detach()``, so the gates get a gradient; the values
    equal those of the hard skip up to rounding. Inference never takes this path.
    """
    num_layers, num_labels = adapter.num_layers, adapter.num_labels
    batch, _, hidden_size = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    out_dtype = output_dtype(dtype, device)

    # The exiting rows' logits are gathered in float32 (float64 for a float64 model) and
    # rounded to the output dtype once, at the end, keeping each row's argmax.
    wide = torch.float64 if out_dtype == torch.float64 else torch.float32
    out_logits = torch.zeros(batch, num_labels, dtype=wide, device=device)
    out_exit = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    out_runs = torch.zeros(batch, dtype=torch.long, device=device)
    result = ExitResult(out_logits, out_exit, out_runs)
    if batch == 0:
        result.logits = out_logits.to(out_dtype)
        if all_exits:
            result.all_logits = torch.zeros(num_layers, 0, num_labels, dtype=out_dtype, device=device)
            if heads.halting_head(policy) is not None:
                result.all_halting = torch.zeros(num_layers, 0, device=device)
                result.all_halting_logits = torch.zeros(num_layers, 0, device=device)
            if isinstance(policy, SkipGates) and heads.gates is not None:
                result.all_skipped = torch.zeros(num_layers, 0, dtype=torch.bool, device=device)
                result.all_gates = torch.zeros(num_layers, 0, device=device)
        return result

    state = start_state(policy, adapter, batch, device, dtype)
    halting_head = heads.halting_head(policy)
    gates = heads.gates if isinstance(policy, SkipGates) else None
    scheduled_counts, read_backs = scheduled_exit_counts(policy, num_layers)
    result.host_syncs += read_backs

    fused = can_fuse_head(backend, adapter)
    pooled_heads = pooled_exit_heads(backend, adapter, device, fused) if halting_head is None else None
    rows = torch.arange(batch, device=device)  # original position of each active row
    runs = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    length_multiple = getattr(adapter, "length_multiple", 1)
    hidden, mask, extents = trimmed_inputs(hidden, mask, mask_summary, result, length_multiple, trims=not all_exits)
    layer_mask = adapter.layer_mask(mask, dtype)

    if all_exits:
        result.all_logits = torch.empty(num_layers, batch, num_labels, dtype=out_dtype, device=device)
        if halting_head is not None:
            result.all_halting = torch.empty(num_layers, batch, dtype=torch.float32, device=device)
            result.all_halting_logits = torch.empty(num_layers, batch, dtype=torch.float32, device=device)
        if gates is not None:
            result.all_skipped = torch.zeros(num_layers, batch, dtype=torch.bool, device=device)
            result.all_gates = torch.zeros(num_layers, batch, dtype=torch.float32, device=device)

    for layer in range(1, num_layers + 1):
        active = hidden.shape[0]
        ran = None  # rows that ran this layer, when SkipGates let some skip
        if gates is not None and 2 <= layer <= num_layers - 1:
            gate = torch.sigmoid(gates[layer - 1](hidden[:, 0]).squeeze(-1).float())
            skip = gate >= policy.skip_threshold
            ran = ~skip
            if all_exits:
                result.all_skipped[layer - 1] = skip
                result.all_gates[layer - 1] = gate
                if train_gates:
                    hard = gate + (skip.float() - gate).detach()
                    mix = hard.to(hidden.dtype)[:, None, None]
                    hidden = (1 - mix) * adapter.run_layer(layer - 1, hidden, layer_mask) + mix * hidden
                else:
                    hidden = torch.where(skip[:, None, None], hidden, adapter.run_layer(layer - 1, hidden, layer_mask))
            else:
                running = int(ran.sum())
                result.host_syncs += 1
                if running == active:
                    hidden = adapter.run_layer(layer - 1, hidden, layer_mask)
                elif running > 0:
                    run_rows = survivor_index(ran, running)
                    sub_mask = None if mask is None else mask.index_select(0, run_rows)
                    sub = adapter.run_layer(
                        layer - 1,
                        hidden.index_select(0, run_rows),
                        adapter.layer_mask(sub_mask, dtype),
                    )
                    hidden = hidden.index_copy(0, run_rows, sub)
                else:
                    continue  # every active row skips: no layer, no head, no exit
            runs = runs + ran.long()
        else:
            hidden = adapter.run_layer(layer - 1, hidden, layer_mask)
            runs = runs + 1

        # Where nobody can leave, there is nothing to write back and no count to read.
        may_exit = layer == num_layers or (
            can_exit_before_last(policy, layer) and (scheduled_counts is None or scheduled_counts[layer] > 0)
        )
        settled = may_exit and ran is None and not all_exits
        if not may_exit and not all_exits and not heads_run_where_none_exit(policy, adapter):
            continue  # nobody leaves here and the state needs no head: the head would be wasted
        # The last layer runs the model's own pooler and classifier, so a sequence that runs
        # every layer gets exactly the unpatched model's logits whatever the backend.
        pooled_head = pooled_heads[layer - 1] if pooled_heads is not None and layer < num_layers else None
        if settled:
            target = WriteBack(rows, runs, extents, out_logits, out_exit, out_runs)
            _, state, order, stats = settle_exits(
                adapter,
                backend,
                policy,
                layer,
                hidden,
                state,
                target,
                HeadRoute(fused, halting_head, pooled_head),
                mask,
            )
        else:
            exits, returned, logits, halting, new_state = head_and_exit_step(
                adapter,
                backend,
                policy,
                layer,
                hidden,
                halting_head,
                state,
                fused=fused,
                mask=mask,
                pooled_head=pooled_head,
            )
        if not settled:
            if ran is not None:
                exits = exits & ran
                new_state = {k: torch.where(_rows_like(ran, v), v, state[k]) for k, v in new_state.items()}
            state = new_state
            if all_exits:
                result.all_logits[layer - 1] = logits
                if result.all_halting is not None:
                    result.all_halting[layer - 1] = torch.sigmoid(halting.float())
                    result.all_halting_logits[layer - 1] = halting.float()
                exits = exits & ~done
                done = done | exits
            if not may_exit:
                continue
            order, stats = write_back(
                WriteBack(rows, runs, extents, out_logits, out_exit, out_runs), exits, returned, layer
            )

        if all_exits or layer == num_layers:
            continue
        # The per-row bookkeeping is put in survivor order before the count is read (``order``
        # is a permutation, the staying rows first): these gathers queue on the device while
        # the host waits, and after the read-back only the hidden-state and mask gather and the
        # layer mask are launched (the rest are slices).
        rows_in_order, runs_in_order = rows.index_select(0, order), runs.index_select(0, order)
        state_in_order = {k: v.index_select(0, order) for k, v in state.items()}
        extents_in_order = extents.index_select(0, order) if extents is not None else None
        read = stats.tolist()  # (count, longest), or (count,) alone from a fast backend without extents
        survivors, longest = read[0], (read[1] if extents is not None else hidden.shape[1])
        result.host_syncs += 1
        if survivors == 0:
            break
        if survivors < active:
            index = order[:survivors]
            hidden, mask = backend.compact(hidden, mask, index, kept_length(longest, hidden.shape[1], length_multiple))
            rows, runs = rows_in_order[:survivors], runs_in_order[:survivors]
            state = {k: v[:survivors] for k, v in state_in_order.items()}
            if extents is not None:
                extents = extents_in_order[:survivors]
            layer_mask = adapter.layer_mask(mask, dtype)
    result.logits = round_keeping_argmax(out_logits, out_dtype)
    return result


def kept_inputs(mask, mask_summary, length: int, result: ExitResult, multiple: int) -> tuple:
    """``(mask, extents, kept)``: the mask and each row's extent (None where nothing is padded: the
    layers then run without a mask, as in Hugging Face) and how many of the ``length`` positions are
    kept, the padding no row needs left out (rounded up to ``multiple``). Reads the mask's summary
    back (counted in ``result``) unless ``mask_summary`` gives it."""
    if mask is None:
        return None, None, length
    if mask_summary is None:
        extents = mask_extents(mask)
        longest, padded = (int(v) for v in torch.stack([extents.max(), (mask == 0).sum()]).tolist())
        result.host_syncs += 1
    else:
        extents, longest, padded = mask_summary
    if padded == 0:
        return None, None, length
    return mask, extents, kept_length(longest, length, multiple)


def trimmed_inputs(hidden, mask, mask_summary, result: ExitResult, length_multiple: int, *, trims: bool = True):
    """The layers' first input: ``(hidden, mask, extents)`` from ``hidden`` [n, S, H] and ``mask`` [n, S] (or None),
    trimmed to [n, S', H] and [n, S'] with ``extents`` [n] (each row's length), with the padding no row needs trimmed
    (``trims``), and ``mask`` and ``extents`` None where nothing is padded (:func:`kept_inputs`)."""
    mask, extents, kept = kept_inputs(mask, mask_summary, hidden.shape[1], result, length_multiple)
    if mask is not None and trims:
        hidden, mask = trim(hidden, mask, kept)
    return hidden, mask, extents


def output_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the model's own logits: its classifier (a Linear) runs in the autocast dtype
    inside autocast (which leaves float64 alone), else in the model's dtype."""
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def kept_length(longest: int, length: int, multiple: int) -> int:
    """The length to trim ``length`` positions to: ``longest`` (at least 1) rounded up to a multiple
    of ``multiple`` (the feed-forward chunk of the layers, which refuse other lengths), at most ``length``."""
    return min(-(-max(longest, 1) // multiple) * multiple, length)


def round_keeping_argmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``logits`` [B, C] in ``dtype`` with each row's argmax unchanged.

    Rounding to a narrower dtype can make the top two values equal (Voting's log-scores at a
    tie broken by the probability sums differ by less than a bfloat16 step), and argmax then
    picks the first; there the top value is raised by one step of ``dtype``.
    """
    if logits.dtype == dtype:
        return logits
    rounded = logits.to(dtype)
    if rounded.numel() == 0 or rounded.shape[-1] < 2:
        return rounded
    winner = logits.argmax(dim=-1, keepdim=True)
    top = rounded.gather(-1, winner)
    tied = rounded.argmax(dim=-1, keepdim=True) != winner
    raised = torch.nextafter(top.detach(), torch.full_like(top, math.inf)) - top.detach()
    return rounded.scatter(-1, winner, top + torch.where(tied, raised, torch.zeros_like(raised)))


def mask_extents(mask: torch.Tensor) -> torch.Tensor:
    """[B] the length each row keeps when the batch is trimmed: its last attended position + 1.

    A row with no attended token attends to every position (eager attention spreads it
    evenly): it keeps the full length, so its logits stay the unpatched model's.
    """
    extents = valid_extent(mask)
    return torch.where(extents > 0, extents, mask.shape[1])


def can_fuse_head(backend: Backend, adapter: EncoderAdapter) -> bool:
    """Whether ``backend`` may run the internal heads fused with the exit step: a tanh-pooler family
    with ``head="model"`` (either pooling: the kernels read ``adapter.pooled_hidden``).

    Only for inference: training needs the model's dropout (also under ``torch.no_grad()``,
    as in Monte-Carlo dropout) and a differentiable head.
    """
    return (
        backend.head_exit_step is not None
        and not torch.is_grad_enabled()
        and not getattr(adapter, "training", False)
        and getattr(adapter, "fuses_internal_heads", hasattr(adapter, "head_weights"))
        and fusable_head_weights(adapter)  # not with quantized Linear layers: their modules run
    )


def pooled_exit_heads(backend: Backend, adapter: EncoderAdapter, device: torch.device, fused: bool) -> list | None:
    """The internal heads as the backend's fused per-layer step reads them (pooling included;
    :mod:`earlyexit_kernels.backends.pooled_head`), one per internal layer (None where a layer's
    head is not of that form), or None where that step does not run: training, a backend without
    it, an adapter without such heads, and a head the backend's fused head covers on a device
    where the backend's whole step is not fused code (``Backend.pooled_head_devices``)."""
    if (
        backend.pooled_head_exit_step_write_back is None
        or torch.is_grad_enabled()
        or getattr(adapter, "training", False)
        or (fused and device.type not in backend.pooled_head_devices)
    ):
        return None
    if not hasattr(adapter, "fused_exit_head"):
        return None
    heads = [adapter.fused_exit_head(layer) for layer in range(1, adapter.num_layers)]
    return heads if any(head is not None for head in heads) else None


def _fused_head_inputs(adapter, policy, layer: int, hidden, mask, state, halting_head) -> tuple:
    """The arguments of the backend's fused head-and-exit step for 1-based ``layer``: the policy and layer, the
    pooled hidden states, the layer's head weights, the state and the halting head."""
    pooled = adapter.pooled_hidden(hidden, mask)
    return (policy, layer, adapter.num_layers, pooled, *adapter.head_weights(layer), state, halting_head)


def head_and_exit_step(
    adapter: EncoderAdapter,
    backend: Backend,
    policy: ExitPolicy,
    layer: int,
    hidden: torch.Tensor,
    halting_head,
    state: dict,
    *,
    fused: bool,
    mask: torch.Tensor | None = None,
    pooled_head=None,
) -> tuple:
    """The exit heads of 1-based ``layer`` on ``hidden`` [n, S, H], then the policy's step.

    With ``fused`` (see :func:`can_fuse_head`) the backend's fused head runs on layers
    before the last, on ``adapter.pooled_hidden`` (the [CLS] rows or their masked mean); the
    last layer always runs the model's own pooler and classifier.
    ``mask``: the 2-D mask [n, S] of ``hidden`` (None: no padding), for a pooling that reads it.
    ``pooled_head`` (a layer of :func:`pooled_exit_heads`): the backend's fused step runs the
    pooling, the head and the rule in one call instead (no halting head).
    Returns ``(exits [n] bool, returned [n, C] float32, logits [n, C], halting [n] or
    None, state)``, as :func:`earlyexit_kernels.methods.exit_rules.head_exit_step`.
    """
    num_layers = adapter.num_layers
    if pooled_head is not None and halting_head is None:
        exits, returned, logits, state = backend.pooled_head_exit_step(
            policy, layer, num_layers, hidden, mask, pooled_head, state
        )
        return exits, returned, logits, None, state
    if fused and layer < num_layers:
        return backend.head_exit_step(*_fused_head_inputs(adapter, policy, layer, hidden, mask, state, halting_head))
    logits, halting = _head_outputs(adapter, layer, hidden, halting_head, state, mask)
    exits, returned, state = backend.exit_step(policy, layer, num_layers, logits, halting, state)
    return exits, returned, logits, halting, state


class HeadRoute(NamedTuple):
    """Which head a layer's exit step runs: ``fused`` (the backend's fused head and rule, where it has
    them), ``halting_head`` (QExit's and DACT's, else None), ``pooled_head`` (a layer of
    :func:`pooled_exit_heads`, never with a halting head), as :func:`head_and_exit_step` picks them."""

    fused: bool
    halting_head: object = None
    pooled_head: object = None


def settle_exits(
    adapter: EncoderAdapter,
    backend: Backend,
    policy: ExitPolicy,
    layer: int,
    hidden: torch.Tensor,
    state: dict,
    target: WriteBack,
    route: HeadRoute,
    mask: torch.Tensor | None = None,
) -> tuple:
    """:func:`head_and_exit_step` of 1-based ``layer`` on ``hidden`` [n, S, H] (``mask`` [n, S]), then the exiting
    rows' logits [C] written to ``target``'s rows
    and the survivors put in order, in the backend's fused kernel where it has one (one launch for
    the head, the decision, the write-back, the count and the order); else PyTorch's write-back.
    ``route``: the head it runs (:class:`HeadRoute`).
    Returns ``(exits [n] bool, state, order [n] int64, stats [2] int64)`` as
    :func:`earlyexit_kernels.backends.write_back.exit_step_write_back`."""
    fused, halting_head, pooled_head = route
    num_layers = adapter.num_layers
    if pooled_head is not None:
        return backend.pooled_head_exit_step_write_back(
            policy, layer, num_layers, hidden, mask, pooled_head, state, target
        )
    if fused and layer < num_layers and backend.head_exit_step_write_back is not None:
        fused_inputs = _fused_head_inputs(adapter, policy, layer, hidden, mask, state, halting_head)
        return backend.head_exit_step_write_back(*fused_inputs, target)
    logits, halting = _head_outputs(adapter, layer, hidden, halting_head, state, mask)
    if backend.exit_step_write_back is not None:
        return backend.exit_step_write_back(policy, layer, num_layers, logits, halting, state, target)
    exits, returned, state = backend.exit_step(policy, layer, num_layers, logits, halting, state)
    order, stats = write_back(target, exits, returned, layer)
    return exits, state, order, stats


def heads_run_where_none_exit(policy: ExitPolicy, adapter: EncoderAdapter) -> bool:
    """Whether the heads run on a layer where no row can leave: the policy's state reads them
    (:func:`~earlyexit_kernels.methods.exit_rules.needs_head_when_none_can_exit`), or the next
    head reads this one's logits."""
    return needs_head_when_none_can_exit(policy) or getattr(adapter, "heads_read_below", False)


def _head_outputs(adapter, layer: int, hidden: torch.Tensor, halting_head, state, mask=None) -> tuple:
    """The head of ``layer`` on ``hidden`` [n, S, H] (``exit_input`` then ``classify``), and the halting logit.

    Heads that read the head below take the state's ``BELOW`` logits and leave theirs there
    (detached: each head learns on what the one below says, as the cached training path)."""
    pooled = adapter.exit_input(layer, hidden, mask)
    below = state.get(BELOW)
    if below is None:
        logits = adapter.classify(layer, pooled)
    else:
        logits = adapter.classify(layer, pooled, below)
        state[BELOW] = logits.detach().to(below.dtype)
    halting = None
    if halting_head is not None:
        halting = halting_head(pooled, state.get("prev_pooled"))
        if "prev_pooled" in state:
            state["prev_pooled"] = pooled
    return logits, halting


def _rows_like(row_mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return row_mask.view(-1, *([1] * (value.dim() - 1)))
