"""The graphed step's buffers: one shape's double buffer, start states and packed outputs, and their load.

A :class:`StaticBatch` holds what the rows of a bucket carry from layer to layer (two halves: each
layer's step reads one and writes the other, :mod:`earlyexit_kernels.engine.graphed.static_step`), the output
rows, the survivor counts on their way to the host, the state every row starts with (made once per
policy, batch and bucket) and the outputs packed in one buffer. :func:`load` puts a forward's rows in
it and :func:`finish` writes its outputs: both read and write fixed addresses and read nothing back,
so that on a GPU each is one captured graph too (the load where its inputs are a prologue's buffers).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from earlyexit_kernels.engine.graphed.step_graphs import StepGraphs
from earlyexit_kernels.engine.step.batch_loop import (
    round_keeping_argmax,
)
from earlyexit_kernels.engine.step.start_state import start_state
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["StaticBatch", "Loaded", "load", "finish", "host_side"]

# Start states kept per static batch (one per policy, batch size and bucket met), the oldest dropped first.
KEPT_TEMPLATES = 16
_SERIALS = itertools.count(1)


@dataclass
class _Half:
    """One half of the double buffer: what the rows of a bucket carry from layer to layer."""

    hidden: torch.Tensor  # [capacity, S, H]
    mask: torch.Tensor | None  # [capacity, S]
    rows: torch.Tensor  # [capacity] int64: original position, ``capacity`` (the scratch output row) for a dead row
    extents: torch.Tensor  # [capacity] int64: one past each row's last attended position (the CPU's plan reads it)
    state: dict[str, torch.Tensor]  # the policy's state, [capacity, ...] each


@dataclass
class _Template:
    """The state a forward's rows start with: ``state`` [bucket, ...] each; ``serial`` keys the load
    graphs that read it; ``policy`` keeps an unhashable policy (keyed by its id) alive."""

    serial: int
    state: dict[str, torch.Tensor]
    policy: ExitPolicy


def policy_key(policy: ExitPolicy):
    """``policy`` where it hashes, else its id (the caller keeps it alive while the key is used)."""
    try:
        hash(policy)
    except TypeError:
        return ("id", id(policy))
    return policy


@dataclass
class PackedOutputs:
    """A forward's outputs in one byte buffer: ``logits`` [capacity, C] in the output dtype, then
    ``exit_layer`` and ``layers_run`` [capacity] int64, each a view of ``buffer`` (8-byte aligned)."""

    buffer: torch.Tensor
    dtype: torch.dtype
    logits: torch.Tensor
    exit_layer: torch.Tensor
    layers_run: torch.Tensor

    @classmethod
    def make(cls, capacity: int, num_labels: int, dtype: torch.dtype, device) -> PackedOutputs:
        logit_bytes = -(-capacity * num_labels * dtype.itemsize // 8) * 8
        buffer = torch.zeros(logit_bytes + 16 * capacity, dtype=torch.uint8, device=device)
        return cls(buffer, dtype, *cls.views(buffer, capacity, num_labels, dtype))

    @staticmethod
    def views(buffer: torch.Tensor, capacity: int, num_labels: int, dtype: torch.dtype) -> tuple:
        """``(logits, exit_layer, layers_run)`` of ``buffer`` (the packed one, or the caller's clone of it)."""
        logit_bytes = buffer.numel() - 16 * capacity
        logits = buffer[: capacity * num_labels * dtype.itemsize]
        exits = buffer[logit_bytes : logit_bytes + 8 * capacity].view(torch.int64)
        runs = buffer[logit_bytes + 8 * capacity :].view(torch.int64)
        return logits.view(dtype).view(capacity, num_labels), exits, runs


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a static batch's buffers are sized by: ``capacity`` rows of ``seq_len`` positions of
    ``hidden_size`` in ``dtype``; outputs of ``num_labels`` logits (in ``wide``) for ``num_layers`` layers;
    on ``device``."""

    capacity: int
    seq_len: int
    hidden_size: int
    num_labels: int
    num_layers: int
    dtype: torch.dtype
    wide: torch.dtype
    device: torch.device


class StaticBatch:
    """The buffers of one shape (mask or not, dtype, device), their fused heads and graphs.

    The hidden states and mask are flat allocations of ``capacity`` rows of ``seq_len`` positions,
    the longest length this batch takes; a forward of a shorter length views their beginning as
    ``[capacity, length, H]`` (:meth:`use_length`), so that every length's rows are contiguous and
    the graphs of every length (keyed by it) share one set of buffers, as the continuous engine's
    calls do."""

    def __init__(self, shape: BatchShape, *, mask, state, stats=None):
        capacity, seq_len, hidden_size = shape.capacity, shape.seq_len, shape.hidden_size
        num_labels, num_layers, dtype, wide, device = (
            shape.num_labels,
            shape.num_layers,
            shape.dtype,
            shape.wide,
            shape.device,
        )
        self.capacity, self.max_length, self.hidden_size = capacity, seq_len, hidden_size
        self._flat = [self._half(capacity, seq_len, hidden_size, dtype, device, mask, state) for _ in range(2)]
        self.halves = self._flat
        self.length = seq_len
        # output rows: one per original position, and a scratch row (index ``capacity``) that
        # the rows which do not exit write to
        self.logits = torch.zeros(capacity + 1, num_labels, dtype=wide, device=device)
        self.exit_layer = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.layers_run = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        # layers run by a row at layer l, l for every row: the graphed step runs every live row
        # through every layer (no SkipGates), so the write-back reads row l and nothing is carried
        self.runs = torch.arange(num_layers + 1, device=device)[:, None].expand(-1, capacity).contiguous()
        self.counts = torch.zeros(num_layers + 1, dtype=torch.long, device=device)
        # a layer where nobody can leave gathers its rows in their own order, nobody exiting
        self.in_place = torch.arange(capacity, device=device)
        self.nobody_exits = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.longest = torch.zeros(num_layers + 1, dtype=torch.long, device=device)  # of the rows that stay
        self.longest_view = self.longest.numpy() if device.type == "cpu" else None  # read by the CPU's plan
        # where the counts reach the host: pinned memory behind one event per layer on a GPU (made once,
        # recorded again by every forward), the counts themselves on the CPU; read as numpy, no tensor read-back
        self.host_counts, self.count_events, self.host_view = host_side(self.counts)
        self.graphs = StepGraphs(device, stats)
        self.lock = threading.Lock()  # one forward at a time on these buffers
        # On a GPU, recorded after a forward's last read of the buffers: the next forward, maybe
        # from another thread on another stream, waits for it before it loads its rows (the lock
        # covers the host's enqueue only, not the device's work).
        self.done = torch.cuda.Event() if device.type == "cuda" else None
        self.done_recorded = False
        # (whether the heads run fused, the fused per-layer heads): built at the first forward
        self.heads: tuple[bool, list | None] | None = None
        # The state every row starts layer 1 with, laid out for a bucket, per (policy, batch, bucket):
        # made once, copied in by the load step (no state built at each forward, none inside a graph).
        self.templates: dict[tuple, _Template] = {}
        # The outputs of a forward, packed in one buffer that the finishing step writes (the logits
        # rounded, the exit layers, the layers run), so that the caller's copy is one clone.
        # One per output dtype met, never replaced: a captured finishing step writes the buffer it was captured with.
        self.packed: dict[torch.dtype, PackedOutputs] = {}
        # The policy (its ``policy_key``) the graphs decide with: the kernels take its thresholds as launch
        # arguments, so a graph captured under one policy replays that policy's decisions (forget_other_policy).
        self.policy = None

    def forget_other_policy(self, policy: ExitPolicy) -> None:
        """Drop the graphs captured under another policy than ``policy`` (a stream engine's ``set_policy``
        moves the thresholds of the model's batches), so that its steps are captured again with its thresholds."""
        key = policy_key(policy)
        if key != self.policy:
            if len(self.graphs) and self.done is not None:
                # a replay may still run on the device: its graphs' memory goes back to the pool only after it
                torch.cuda.synchronize(self.graphs.device)
            self.graphs.forget(lambda _: True)
            # the policy itself held too: an unhashable one is keyed by its id, which a freed object's successor reuses
            self.policy, self._policy_held = key, policy

    @staticmethod
    def _half(capacity, seq_len, hidden_size, dtype, device, mask, state) -> _Half:
        return _Half(
            hidden=torch.zeros(capacity, seq_len, hidden_size, dtype=dtype, device=device),
            mask=None if mask is None else torch.ones(capacity, seq_len, dtype=mask.dtype, device=device),
            rows=torch.full((capacity,), capacity, dtype=torch.long, device=device),
            extents=torch.zeros(capacity, dtype=torch.long, device=device),
            state={k: torch.zeros((capacity, *v.shape[1:]), dtype=v.dtype, device=device) for k, v in state.items()},
        )

    def template(self, policy: ExitPolicy, adapter, batch: int, bucket: int) -> _Template:
        """The state rows ``0..bucket`` start layer 1 with (the dead rows ``batch..bucket`` a copy of row 0's)."""
        key = (policy_key(policy), batch, bucket)
        template = self.templates.get(key)
        if template is None:
            first = self.halves[1]
            device, dtype = first.hidden.device, first.hidden.dtype
            with torch.inference_mode(False):
                state = start_state(policy, adapter, batch, device, dtype)
                state = {k: torch.cat([v, v[:1].expand(bucket - batch, *v.shape[1:])]) for k, v in state.items()}
            while len(self.templates) >= KEPT_TEMPLATES:
                self.templates.pop(next(iter(self.templates)))
            template = self.templates[key] = _Template(next(_SERIALS), state, policy)
        return template

    def outputs(self, out_dtype: torch.dtype) -> PackedOutputs:
        """The packed output buffer of this batch's capacity in ``out_dtype`` (made at its first use and kept: a
        forward under autocast and one without alternate between two, each with its own captured finishing step)."""
        packed = self.packed.get(out_dtype)
        if packed is None:
            with torch.inference_mode(False):  # a normal tensor, written in place by later forwards
                packed = self.packed[out_dtype] = PackedOutputs.make(
                    self.capacity, self.logits.shape[1], out_dtype, self.logits.device
                )
        return packed

    def use_length(self, length: int) -> None:
        """Make ``halves`` views of ``length`` positions a row (at most ``max_length``)."""
        if length == self.length:
            return
        if length > self.max_length:
            raise ValueError(f"a length of {length} exceeds the buffers' {self.max_length}")
        count = self.capacity * length
        self.halves = [
            _Half(
                hidden=half.hidden.view(-1)[: count * self.hidden_size].view(self.capacity, length, self.hidden_size),
                mask=None if half.mask is None else half.mask.view(-1)[:count].view(self.capacity, length),
                rows=half.rows,
                extents=half.extents,
                state=half.state,
            )
            for half in self._flat
        ]
        self.length = length

    def fits(self, bucket: int, state: dict, length: int) -> bool:
        held = self.halves[0].state
        return (
            bucket <= self.capacity
            and length <= self.max_length
            and held.keys() == state.keys()
            and all(held[k].shape[1:] == v.shape[1:] and held[k].dtype == v.dtype for k, v in state.items())
        )


def host_side(counts: torch.Tensor) -> tuple:
    """How per-layer ``counts`` (on the device) reach the host: ``(pinned host copy, one event per entry, its numpy
    view)`` on a GPU, where a step writes the copy and records nothing else; on the CPU ``(None, None, the counts'
    own numpy view)``. Read through :func:`~earlyexit_kernels.engine.graphed.static_step.published_count`."""
    if counts.device.type != "cuda":
        return None, None, counts.numpy()
    host = torch.zeros(counts.shape, dtype=counts.dtype, pin_memory=True)
    return host, [torch.cuda.Event() for _ in range(counts.shape[0])], host.numpy()


@dataclass
class Loaded:
    """A forward's rows as the load step reads them: ``hidden`` [B, S, H] and ``mask`` [B, S] (or None:
    nothing padded), of which the first ``kept`` positions are kept; ``extents`` [B] (None without a mask)."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    extents: torch.Tensor | None
    kept: int


def load(static: StaticBatch, rows: Loaded, template: _Template, batch: int, bucket: int) -> None:
    """Put a forward's rows in the first half (layer 1 reads half 1 % 2) and reset the outputs: the
    first ``kept`` positions of each row, the rest of the buffers' length masked out (zeros), the dead
    rows ``batch..bucket`` zeros under a whole mask, the start state copied from ``template``. No host
    read and fixed addresses where the inputs are a prologue's: a CUDA graph holds it."""
    first = static.halves[1]
    length, kept = first.hidden.shape[1], rows.kept
    first.hidden[:batch, :kept].copy_(rows.hidden[:, :kept])
    if kept < length:  # a GPU's rounding up: masked positions
        first.hidden[:batch, kept:].zero_()
    first.hidden[batch:bucket].zero_()
    if rows.mask is not None:
        first.mask[:batch, :kept].copy_(rows.mask[:, :kept])
        if kept < length:
            first.mask[:batch, kept:].zero_()
        first.mask[batch:bucket].fill_(1)
    torch.arange(bucket, out=first.rows[:bucket])
    first.rows[batch:bucket].fill_(static.capacity)  # dead: their outputs go to the scratch row
    if rows.extents is not None:
        first.extents[:batch].copy_(rows.extents)  # the inputs' summary's: not computed again
    else:
        first.extents[:batch].fill_(length)
    first.extents[batch:bucket].zero_()
    for k, v in template.state.items():
        first.state[k][:bucket].copy_(v)
    static.logits.zero_()
    static.exit_layer.zero_()
    static.layers_run.zero_()


def finish(static: StaticBatch, packed: PackedOutputs, batch: int) -> None:
    """The forward's outputs into the packed buffer: the logits rounded to the output dtype (each row's
    argmax kept), the exit layers and layers run. No host read: a CUDA graph holds it."""
    packed.logits[:batch].copy_(round_keeping_argmax(static.logits[:batch], packed.dtype))
    packed.exit_layer[:batch].copy_(static.exit_layer[:batch])
    packed.layers_run[:batch].copy_(static.layers_run[:batch])
