"""One call of the segment engine: the graphed step on a range of layers, its rows loaded from a queue.

The segment engine (:mod:`earlyexit_kernels.engine.engines.segments.engine`) splits the layers into
segments of consecutive layers, each with its own queue. A call of a segment runs the graphed
step's per-layer step (:func:`earlyexit_kernels.engine.graphed.static_step.layer_step`, reused as it is:
the encoder layer, the exit heads, the policy's decision and the write-back of the exiting rows'
logits, exit layer and layers run, then the survivors gathered alive-first) over the segment's
layers only, on buffers of the segment's own (:class:`~earlyexit_kernels.engine.graphed.static_buffers.StaticBatch`,
one per segment, so that on CUDA each (layer, bucket, length) step of a segment is captured once:
graphs per segment and bucket). What differs from :func:`~earlyexit_kernels.engine.graphed.static_step.run_graphed`:

- the **load**: the first segment loads the embeddings and the policy's start state, as
  ``run_graphed`` does (:func:`~earlyexit_kernels.engine.graphed.static_buffers.load`); a later segment loads
  rows handed on by earlier calls (:class:`Carried`: their hidden states and the policy's state per
  row, pieces of several calls), their mask rebuilt from each row's extent (known on the host) and
  their dead rows' state from the start state. This load reads tensors at other addresses every
  call, so on CUDA it runs uncaptured (a few copies per piece); the layer steps and the finish are
  captured;
- the **hand-off**: after the segment's last layer (below the model's last) the survivors sit
  alive-first in the half the last step wrote; their hidden states and state are copied out
  (:class:`Carried`, the segment's buffers are free for its next call) and their load positions
  and count are returned on the device, for the engine to read a call late.

The buffers (and graphs) of every segment are kept with the patched model's static batches
(:func:`segment_steps`): each eek.classify call makes an engine, and the second replays what the
first captured. A segment's buffers grow to the most rows and the longest length met, never
shrink: a new set of buffers is a new set of graphs.

No host read happens inside a call beyond the graphed step's own (its survivor counts, published
behind events and read a layer late on CUDA, read at once from host memory on the CPU): the exit
decisions stay on the device. On the CPU the plan is the exact step's (every count its bucket,
the padding nobody needs trimmed), so a segment call on the rows one exact-step batch holds at
its first layer gives that batch's bits.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from dataclasses import dataclass

import torch

from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.buckets import SurvivorLag, bucket_for
from earlyexit_kernels.engine.graphed.static_buffers import (
    BatchShape,
    Loaded,
    StaticBatch,
    load,
)
from earlyexit_kernels.engine.graphed.static_step import (
    CUDA_LENGTH_STEP,
    GraphedStep,
    StaticBatches,
    capture_by_default,
    finished_outputs,
    layer_step,
    masked_to_step,
    static_heads,
    survivor_count,
)
from earlyexit_kernels.engine.step.batch_loop import kept_length, output_dtype
from earlyexit_kernels.engine.step.heads import ExitHeads, weights_fingerprint
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy
from earlyexit_kernels.methods.exit_rules import can_exit_before_last

__all__ = ["Carried", "Piece", "SegmentCall", "SegmentSteps", "segment_bounds", "segment_steps"]

# The segment steps kept per patched model (by its static batches) and key, the most recent last: each holds
# its segments' buffers and graphs.
KEPT_STEPS = 2
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KEPT_LOCK = threading.Lock()


def segment_bounds(num_layers: int, segments: int) -> list[tuple[int, int]]:
    """The 1-based ``(first, last)`` layers of each of ``segments`` segments of consecutive layers, as
    equal as they can be, the first ones a layer longer where ``num_layers`` does not divide
    (12 layers in 3: 1-4, 5-8, 9-12; 5 in 3: 1-2, 3-4, 5)."""
    if not isinstance(segments, int) or isinstance(segments, bool) or not 1 <= segments <= num_layers:
        raise ValueError(f"segments must be an integer in 1..{num_layers} (the model's layers), got {segments!r}")
    size, longer = divmod(num_layers, segments)
    bounds, first = [], 1
    for index in range(segments):
        last = first + size - 1 + (index < longer)
        bounds.append((first, last))
        first = last + 1
    return bounds


def segment_steps(batches: StaticBatches, adapter, heads: ExitHeads, backend, device, dtype) -> SegmentSteps:
    """The :class:`SegmentSteps` a patched model keeps with its static ``batches`` for this adapter, backend,
    device, dtype and heads' weights (where they are and their versions, as ``run_graphed`` keys its buffers):
    made at the first engine, so that the engines ``eek.classify`` makes call after call replay the graphs the
    first one captured, as the cohort engine's live in the model's static batches. Their plan is ``batches``'."""
    key = (backend.name, str(device), dtype, id(adapter), weights_fingerprint(heads, adapter))
    with _KEPT_LOCK:
        kept = _KEPT.setdefault(batches, {})
        steps = kept.pop(key, None)
        if steps is None:
            plan = StaticBatches(
                sizes=batches.sizes, lag=batches.lag, dead_fill=batches.dead_fill, head_kernels=batches.head_kernels
            )
            steps = SegmentSteps(adapter, heads, backend, plan, device, dtype)  # holds the adapter: its id stays its
        kept[key] = steps
        while len(kept) > KEPT_STEPS:
            kept.pop(next(iter(kept)))
    return steps


@dataclass(eq=False, slots=True)
class Carried:
    """The rows a segment call handed on, on the device, alive first (the dead ones after them):
    ``hidden`` [n, S, H] after the call's last layer, ``state`` the policy's per-row state [n, ...]
    each, ``masked``: whether their first call ran with a mask (the exact step keeps a batch's mask
    to its end, so the rows keep it too)."""

    hidden: torch.Tensor
    state: dict[str, torch.Tensor]
    masked: bool


@dataclass(eq=False, slots=True)
class Piece:
    """``count`` rows of ``carried`` from row ``start`` on, loaded together into a call."""

    carried: Carried
    start: int
    count: int


@dataclass(eq=False, slots=True)
class SegmentCall:
    """What a segment call leaves on the device: ``logits`` [B, C] (output dtype), ``exit_layer`` and
    ``layers_run`` [B] (0 for a row that did not exit in this segment) in load order; ``survivors``
    [bucket + 1] int64: the load positions of the rows that go on, alive first (a dead row's is the
    buffers' capacity), then their count (None after the model's last layer); ``carried``: those rows
    (None after the last layer or where none is left); ``buckets``: the bucket of each layer run;
    ``length``: the padded length the call ran at."""

    logits: torch.Tensor
    exit_layer: torch.Tensor
    layers_run: torch.Tensor
    survivors: torch.Tensor | None
    carried: Carried | None
    buckets: list[int]
    length: int


class SegmentSteps:
    """The graphed step of a patched model over ranges of its layers, with one set of buffers (and
    graphs) per segment. ``batches``: the bucket plan, dead-row fill, head kernels and graph counts
    (a :class:`~earlyexit_kernels.engine.graphed.static_step.StaticBatches`, not sharing its buffers)."""

    def __init__(self, adapter, heads: ExitHeads, backend, batches: StaticBatches, device: torch.device, dtype):
        self.adapter, self.heads, self.backend, self.batches = adapter, heads, backend, batches
        self.device, self.dtype = device, dtype
        self.sizes, self.lag = batches.plan(device.type)
        self.length_multiple = getattr(adapter, "length_multiple", 1)
        self._statics: dict[tuple, StaticBatch] = {}
        self._no_mask = torch.empty(0, dtype=torch.long)  # the mask's dtype, for the buffers
        # One call at a time on the buffers (engines on several threads share them); on a GPU, recorded after a
        # call's last use of them: the next call, maybe on another stream, waits for it before its load.
        self.lock = threading.Lock()
        self._done = torch.cuda.Event() if device.type == "cuda" else None
        self._done_recorded = False

    def padded_length(self, longest: int) -> int:
        """The length a call whose longest row has ``longest`` tokens runs at: rounded up to the graphed
        step's length step on CUDA (so calls of mixed lengths share captured shapes), trimmed as the exact
        step trims on the CPU."""
        if self.device.type == "cuda":
            step = math.lcm(CUDA_LENGTH_STEP, self.length_multiple)
            return -(-longest // step) * step
        return kept_length(longest, longest + self.length_multiple, self.length_multiple)

    def run_first(self, policy, bounds: tuple[int, int], hidden, mask, summary) -> SegmentCall:
        """The first segment on a cohort's embeddings ``hidden`` [B, S, H] and ``mask`` [B, S], with the mask's
        ``summary`` ``(extents [B] on the device, longest, padded count)`` known on the host."""
        batch, in_length, _ = hidden.shape
        extents, longest, padded = summary
        masked = padded > 0
        kept = kept_length(longest, in_length, self.length_multiple) if masked else in_length
        if self.device.type == "cuda" and not masked:  # rounded up to the step as padded calls are
            step = math.lcm(CUDA_LENGTH_STEP, self.length_multiple)
            mask, extents = masked_to_step(None, None, batch, kept, step, self.device)
            masked = mask is not None
        seq_len = self.padded_length(kept) if masked else kept
        loaded = Loaded(hidden, mask if masked else None, extents if masked else None, kept)

        def load_rows(static, template, bucket):
            load(static, loaded, template, batch, bucket)

        return self._run(policy, bounds, batch, seq_len, masked, load_rows)

    def run_carried(
        self, policy, bounds: tuple[int, int], pieces: list[Piece], extents: torch.Tensor, lengths
    ) -> SegmentCall:
        """A later segment on ``pieces`` of rows handed on by earlier calls, in that order; ``extents`` [B]:
        each row's length on the device, ``lengths`` the same on the host."""
        batch = sum(piece.count for piece in pieces)
        longest, shortest = int(max(lengths)), int(min(lengths))
        if self.device.type == "cuda":
            seq_len = self.padded_length(longest)
        else:  # as the exact step trims: to the longest, within what the rows hold
            width = max(piece.carried.hidden.shape[1] for piece in pieces)
            seq_len = kept_length(longest, width, self.length_multiple)
        masked = any(piece.carried.masked for piece in pieces) or shortest < seq_len

        def load_rows(static, template, bucket):
            _load_carried(static, bounds[0], pieces, extents if masked else None, template, batch, bucket)

        return self._run(policy, bounds, batch, seq_len, masked, load_rows)

    # ------------------------------------------------------------------ internals

    def _static(self, first: int, masked: bool, bucket: int, length: int, state_shapes: dict) -> StaticBatch:
        """The segment's buffers holding ``bucket`` rows of ``length``, grown (never shrunk) where they are
        too small: a new set of buffers is a new set of graphs."""
        key = (first, masked)
        static = self._statics.get(key)
        if static is None or not static.fits(bucket, state_shapes, length):
            capacity = max(bucket, static.capacity if static is not None else 0)
            longest = max(length, static.max_length if static is not None else 0)
            adapter = self.adapter
            wide = torch.float64 if self.dtype == torch.float64 else torch.float32
            shape = BatchShape(
                capacity,
                longest,
                adapter.hidden_size,
                adapter.num_labels,
                adapter.num_layers,
                self.dtype,
                wide,
                self.device,
            )
            with torch.inference_mode(False):  # written in place by later calls under no_grad()
                static = StaticBatch(
                    shape, mask=self._no_mask if masked else None, state=state_shapes, stats=self.batches.stats
                )
            self._statics[key] = static
        return static

    def _run(self, policy, bounds, batch: int, seq_len: int, masked: bool, load_rows) -> SegmentCall:
        check_graphed_policy(policy)
        with self.lock, step_graphs.on_device(self.device):
            if self._done_recorded:
                torch.cuda.current_stream(self.device).wait_event(self._done)
            call = self._locked_run(policy, bounds, batch, seq_len, masked, load_rows)
            if self._done is not None:
                self._done.record()
                self._done_recorded = True
        return call

    def _locked_run(self, policy, bounds, batch: int, seq_len: int, masked: bool, load_rows) -> SegmentCall:
        adapter, batches = self.adapter, self.batches
        capture = capture_by_default(self.device)  # per call, as run_graphed: not with grad, not under autocast
        first, last = bounds
        num_layers = adapter.num_layers
        out_dtype = output_dtype(self.dtype, self.device)
        state_shapes = batches.state_shapes(policy, adapter, batch, self.dtype)
        first_bucket = bucket_for(batch, self.sizes)
        static = self._static(first, masked, first_bucket, seq_len, state_shapes)
        static.forget_other_policy(policy)  # graphs captured under other thresholds replay those
        halting_head = self.heads.halting_head(policy)
        fused, pooled_heads = static_heads(
            static, batches.head_kernels, self.backend, adapter, self.device, halting_head
        )
        trims = self.sizes is None and self.lag == 0 and masked
        step = GraphedStep(
            adapter, self.backend, policy, halting_head, fused, pooled_heads, self.dtype, batches.dead_fill, trims
        )
        static.use_length(seq_len)
        template = static.template(policy, adapter, batch, first_bucket)
        load_rows(static, template, first_bucket)
        survivors = SurvivorLag(batch, lag=self.lag, sizes=self.sizes)
        length, ran = seq_len, 0
        for layer in range(first, last + 1):
            bucket = survivors.bucket_before(layer - first + 1)
            if bucket == 0:
                break
            may_exit = layer == num_layers or can_exit_before_last(policy, layer)
            run_step = functools.partial(layer_step, step, static, layer, bucket, may_exit, length)
            step_graphs.run_step(static.graphs, (layer, bucket, may_exit, length), run_step, capture)
            ran = layer
            if may_exit and layer < last:
                survivors.publish(layer - first + 1, survivor_count(static, layer))
                if trims:
                    length = kept_length(int(static.longest_view[layer]), length, self.length_multiple)
        logits, exit_layer, layers_run = finished_outputs(static, batch, out_dtype, capture)
        if last == num_layers:
            carried = handed = None
        elif ran < last:  # every row left before the segment's end: nobody is handed on
            handed = torch.zeros(1, dtype=torch.long, device=self.device)
            carried = None
        else:
            bucket = survivors.buckets[-1]
            half = static.halves[(last + 1) % 2]
            handed = torch.cat([half.rows[:bucket], static.counts[last : last + 1]])
            hidden = half.hidden[:bucket, :length].clone()
            carried = Carried(hidden, {k: v[:bucket].clone() for k, v in half.state.items()}, masked)
        return SegmentCall(logits, exit_layer, layers_run, handed, carried, list(survivors.buckets), seq_len)


def _load_carried(static: StaticBatch, first: int, pieces: list[Piece], extents, template, batch: int, bucket: int):
    """Put the rows of ``pieces`` in the half layer ``first`` reads, in order, and reset the outputs: each row's
    hidden states up to the buffers' length (zeros beyond what its piece holds), its mask from ``extents``
    (None: no mask), its state; the dead rows ``batch..bucket`` zeros under a whole mask, their state the start
    state's. No host read."""
    half = static.halves[first % 2]
    length = half.hidden.shape[1]
    offset = 0
    for piece in pieces:
        rows = slice(offset, offset + piece.count)
        source = piece.carried.hidden[piece.start : piece.start + piece.count]
        width = min(source.shape[1], length)
        half.hidden[rows, :width].copy_(source[:, :width])
        if width < length:
            half.hidden[rows, width:].zero_()
        for k, v in piece.carried.state.items():
            half.state[k][rows].copy_(v[piece.start : piece.start + piece.count])
        offset += piece.count
    half.hidden[batch:bucket].zero_()
    if half.mask is not None:
        positions = torch.arange(length, device=half.mask.device)
        half.mask[:batch].copy_(positions < extents[:, None])
        half.mask[batch:bucket].fill_(1)
        half.extents[:batch].copy_(extents)
    else:
        half.extents[:batch].fill_(length)
    half.extents[batch:bucket].zero_()
    torch.arange(bucket, out=half.rows[:bucket])
    half.rows[batch:bucket].fill_(static.capacity)
    for k, v in template.state.items():
        half.state[k][batch:bucket].copy_(v[batch:bucket])
    static.logits.zero_()
    static.exit_layer.zero_()
    static.layers_run.zero_()
