"""The graphed step: a batch in fixed buckets, exited rows kept as dead rows, no read-back between layers.

``step="exact"`` (:mod:`earlyexit_kernels.engine.step.batch_loop`) compacts after every layer where
rows may leave, and must read the survivor count back to know the next shape: one blocking
read-back per such layer, and shapes that differ from batch to batch. Here instead every
layer's step has fixed shapes: the batch lives in a bucket of rows
(:mod:`earlyexit_kernels.engine.graphed.buckets`), and the step of (layer, bucket)

1. runs the encoder layer on the bucket's rows,
2. runs the exit heads and the policy's decision on them,
3. writes each exiting row's logits, exit layer and layers run at its original position (a dead
   row's ``rows`` is the scratch output row: what it writes lands there); 2 and 3 are the
   backend's fused kernel with write-back, as in the exact step,
4. gathers the rows into the other half of a double buffer by that kernel's stable survivor
   order, the live rows that stay first, and marks the rows that left dead,
5. counts the live rows into a device buffer.

The host never waits for that count inside the layers: it is read ``lag`` layers later to pick
a smaller bucket (alive rows sit first, so a bucket's first rows hold them all). Each step reads
one half of the buffers and writes the other (and the output rows it owns), so running it twice
gives the same state: a CUDA graph can be warmed up, captured and replayed on the real buffers
(:mod:`earlyexit_kernels.engine.graphed.step_graphs`). On the CPU the same step runs uncaptured, for the
tests; it gives the exact step's outputs bit for bit.

The buffers are allocated once per shape (and grown for a larger batch); heads, fused weights
and launch arguments are built once with them, not on every forward
(:mod:`earlyexit_kernels.engine.graphed.static_buffers`: the buffers, the start states, and the load and
finishing steps, each captured as one graph on a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from earlyexit_kernels.backends.registry import Backend
from earlyexit_kernels.backends.survivor_gather import gather_survivors
from earlyexit_kernels.backends.write_back import WriteBack
from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.buckets import ReadyCount, SurvivorLag, bucket_for, default_plan
from earlyexit_kernels.engine.graphed.prologue import Prologues
from earlyexit_kernels.engine.graphed.static_buffers import (
    KEPT_TEMPLATES,
    BatchShape,
    Loaded,
    PackedOutputs,
    StaticBatch,
    finish,
    load,
    policy_key,
)
from earlyexit_kernels.engine.graphed.step_graphs import GraphStats, PinnedCount
from earlyexit_kernels.engine.step.batch_loop import (
    ExitResult,
    HeadRoute,
    can_fuse_head,
    head_and_exit_step,
    heads_run_where_none_exit,
    kept_inputs,
    kept_length,
    output_dtype,
    pooled_exit_heads,
    scheduled_exit_counts,
    settle_exits,
)
from earlyexit_kernels.engine.step.heads import ExitHeads, weights_fingerprint
from earlyexit_kernels.engine.step.start_state import start_state
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy
from earlyexit_kernels.methods.exit_rules import can_exit_before_last
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["StaticBatches", "static_batches_of", "run_graphed", "capture_by_default", "CUDA_LENGTH_STEP"]

# On a GPU a padded batch's length is rounded up to a multiple of this (masked positions), so
# that a stream of batches of mixed lengths shares a few captured shapes. Not on the CPU, whose
# static step must give the exact step's bits.
CUDA_LENGTH_STEP = 32
# Shapes (mask or not, dtype, backend, policy, ...) whose buffers and graphs are kept, most recent
# first; every length up to the longest met shares one shape's buffers.
KEPT_SHAPES = 4


class StaticBatches:
    """A patched model's static batches, by shape, the most recently used first (at most ``KEPT_SHAPES``).

    ``sizes`` and ``lag``: the bucket plan (:class:`~earlyexit_kernels.engine.graphed.buckets.SurvivorLag`);
    ``"device"`` and None: the device's (:func:`~earlyexit_kernels.engine.graphed.buckets.default_plan`).
    ``dead_fill``: a value written over the dead rows' hidden states after every layer (tests: what
    a dead row holds must never reach a live one).
    ``prologue``: the inputs' summary and the embeddings as one captured step too
    (:mod:`~earlyexit_kernels.engine.graphed.prologue`); off by default until a GPU has timed it.
    ``head_kernels``: ``"fused"``, the backend's fused head and rule where it has them (one kernel
    for the pooling, both Linear layers and the rule); ``"torch"``, the heads as the model's modules
    (cuBLAS's GEMMs on a GPU), then the backend's rule: a GPU measures which is faster at its shape.
    """

    HEAD_KERNELS = ("fused", "torch")

    def __init__(
        self,
        *,
        sizes: tuple[int, ...] | None | str = "device",
        lag: int | None = None,
        dead_fill=None,
        prologue: bool = False,
        head_kernels: str = "fused",
    ):
        if head_kernels not in self.HEAD_KERNELS:
            raise ValueError(f"head_kernels must be one of {self.HEAD_KERNELS}, got {head_kernels!r}")
        self._kept: dict[tuple, StaticBatch] = {}
        self._state_shapes: dict[tuple, tuple] = {}
        self.sizes, self.lag, self.dead_fill, self.prologue = sizes, lag, dead_fill, prologue
        self.head_kernels = head_kernels
        self.stats = GraphStats()  # every shape's captures, replays and fallbacks, evicted ones included
        self.prologues = Prologues(self.stats)
        self.made = 0  # static batches made (each with its own graphs): a stream's shapes should settle

    def state_shapes(self, policy: ExitPolicy, adapter, batch: int, dtype: torch.dtype) -> dict:
        """The start state's tensors of ``batch`` rows on the meta device (their shapes and dtypes, for
        the buffers), made once per policy, adapter, batch and dtype: between the inputs' read-back and
        the first launch the host's time is the device's idle time."""
        key = (policy_key(policy), id(adapter), batch, dtype)
        entry = self._state_shapes.get(key)
        if entry is None:
            shapes = start_state(policy, adapter, batch, torch.device("meta"), dtype)
            while len(self._state_shapes) >= KEPT_TEMPLATES:
                self._state_shapes.pop(next(iter(self._state_shapes)))
            # the policy and adapter kept with their shapes: the key holds ids, which a freed object's successor reuses
            entry = self._state_shapes[key] = (shapes, policy, adapter)
        return entry[0]

    def plan(self, device_type: str) -> tuple[tuple[int, ...] | None, int]:
        sizes, lag = default_plan(device_type)
        return (sizes if self.sizes == "device" else self.sizes), (lag if self.lag is None else self.lag)

    def get(self, key: tuple, bucket: int, state: dict, length: int, make) -> StaticBatch:
        """The static batch of ``key`` that holds ``bucket`` rows of ``length`` positions, made anew
        (by ``make(rows, longest)``) where the one kept is too small (the forward views it at ``length``
        under its lock).

        A new one takes the larger of each dimension, the kept one's and the asked one's: under a token budget
        rows and length trade places (many short rows, then a few long ones, then many short ones again), and
        buffers sized to the last batch alone were made anew, their graphs dropped, whenever either grew (on the CPU with
        the GPU's plan: 8 times a pass over a 96-text length sweep, every pass); grown to both, they are made a few
        times in the first pass and never after (``made``)."""
        static = self._kept.pop(key, None)
        if static is None or not static.fits(bucket, state, length):
            rows, longest = bucket, length
            if static is not None:
                rows, longest = max(rows, static.capacity), max(longest, static.max_length)
            # Normal tensors even under inference_mode(): an inference tensor cannot be written in
            # place outside it, and a later forward under no_grad() loads its rows into these buffers.
            with torch.inference_mode(False):
                static = make(rows, longest)
            self.made += 1
        self._kept[key] = static
        while len(self._kept) > KEPT_SHAPES:
            self._kept.pop(next(iter(self._kept)))
        return static

    def clear(self) -> None:
        self._kept.clear()
        self._state_shapes.clear()
        self.prologues.clear()

    # A patched model is pickled, copied and saved with its record: the buffers and graphs are
    # a cache of this process and device, so a copy starts without them.
    def __getstate__(self):
        return {
            "sizes": self.sizes,
            "lag": self.lag,
            "dead_fill": self.dead_fill,
            "prologue": self.prologue,
            "head_kernels": self.head_kernels,
        }

    def __setstate__(self, state):
        self._kept, self._state_shapes = {}, {}
        self.stats = GraphStats()
        self.made = 0
        self.prologues = Prologues(self.stats)
        self.sizes, self.lag, self.dead_fill = state["sizes"], state["lag"], state["dead_fill"]
        self.prologue = state.get("prologue", False)  # a record saved before the option had none
        self.head_kernels = state.get("head_kernels", "fused")


def static_batches_of(state) -> StaticBatches:
    """A patched record's static batches (``state.static_batches``), made at their first use: one per record,
    shared by the patched forward's graphed step and every engine on the model."""
    if state.static_batches is None:
        state.static_batches = StaticBatches()
    return state.static_batches


@dataclass
class GraphedStep:
    """What the step of every layer of one forward reads besides the buffers."""

    adapter: object
    backend: Backend
    policy: ExitPolicy
    halting_head: object
    fused: bool
    pooled_heads: list | None
    dtype: torch.dtype
    dead_fill: float | None
    trims: bool = False  # the CPU's plan: the extents followed, the longest counted for trimming


def layer_step(step: GraphedStep, static: StaticBatch, layer: int, bucket: int, may_exit: bool, length: int) -> None:
    """The static step of 1-based ``layer`` on the first ``bucket`` rows and ``length`` positions:
    reads half ``layer % 2``, writes half ``(layer + 1) % 2`` and the output rows of the rows that
    exit. No host read. (``length`` is the buffers' on a GPU; the CPU's plan trims, as the exact step.)

    A dead row's ``rows`` is ``capacity``, the scratch output row: the backend's write-back (one
    fused kernel on the fast backends, as in the exact step) writes every row that exits at its
    ``rows``, dead ones harmlessly into the scratch row. Dead rows sit after the live ones, so the
    stable survivor order keeps the live stayers first; the rows that left are marked dead as
    they are gathered, and the live ones counted."""
    adapter, num_layers = step.adapter, step.adapter.num_layers
    src, dst = static.halves[layer % 2], static.halves[(layer + 1) % 2]
    hidden = src.hidden[:bucket, :length]
    mask = None if src.mask is None else src.mask[:bucket, :length]
    if length < src.hidden.shape[1]:  # trimmed: the layer reads contiguous rows, as after the exact step's trim
        hidden = hidden.contiguous()
        mask = None if mask is None else mask.contiguous()
    rows = src.rows[:bucket]
    extents = src.extents[:bucket]
    state = {k: v[:bucket] for k, v in src.state.items()}
    out = adapter.run_layer(layer - 1, hidden, adapter.layer_mask(mask, step.dtype))
    pooled_head = step.pooled_heads[layer - 1] if step.pooled_heads is not None and layer < num_layers else None
    if not may_exit:  # nobody leaves: the rows go on in place, gathered in their own order
        if heads_run_where_none_exit(step.policy, adapter):
            *_, state = head_and_exit_step(
                adapter,
                step.backend,
                step.policy,
                layer,
                out,
                step.halting_head,
                state,
                fused=step.fused,
                mask=mask,
                pooled_head=pooled_head,
            )
        order, exits, stats = static.in_place[:bucket], static.nobody_exits[:bucket], None
    else:
        runs = static.runs[layer, :bucket]  # every live row has run every layer so far (no skip gates here)
        target = WriteBack(
            rows, runs, extents if step.trims else None, static.logits, static.exit_layer, static.layers_run
        )
        route = HeadRoute(step.fused, step.halting_head, pooled_head)
        exits, state, order, stats = settle_exits(
            adapter, step.backend, step.policy, layer, out, state, target, route, mask
        )
        if layer == num_layers:
            return
    # The rows that exit now are dead from the next layer on; the order puts the live stayers
    # first. One op on the fast backends: the rows, their live count (into pinned host memory on a
    # GPU, no copy after the graph) and every per-row tensor gathered by the order.
    sources, targets = [out], [dst.hidden[:bucket, :length]]
    if out.dtype != dst.hidden.dtype:
        sources[0] = out.to(dst.hidden.dtype)
    if mask is not None:
        sources.append(mask)
        targets.append(dst.mask[:bucket, :length])
    if step.trims:  # only the CPU's plan reads the extents and the longest (fixed buckets keep the length)
        sources.append(extents)
        targets.append(dst.extents[:bucket])
        if stats is not None:
            static.longest[layer : layer + 1].copy_(stats[1:2])
    for k, v in state.items():
        sources.append(v)
        targets.append(dst.state[k][:bucket])
    # the host reads the count of a layer where rows may leave (a quiet layer's is never published)
    host_count = None if static.host_counts is None or not may_exit else static.host_counts[layer : layer + 1]
    gather = step.backend.gather_survivors or gather_survivors
    next_rows = dst.rows[:bucket]
    gather(
        order, exits, rows, static.capacity, next_rows, static.counts[layer : layer + 1], sources, targets, host_count
    )
    if step.dead_fill is not None:  # tests: what dead rows hold must never reach a live one
        dead = (next_rows == static.capacity)[:, None, None]
        dst.hidden[:bucket, :length].masked_fill_(dead, step.dead_fill)


def run_graphed(adapter, heads: ExitHeads, policy: ExitPolicy, backend: Backend, hidden, mask, **options) -> ExitResult:
    """:func:`_run_graphed` with the model's device the current CUDA device (:func:`step_graphs.on_device`)."""
    with step_graphs.on_device(hidden.device):
        return _run_graphed(adapter, heads, policy, backend, hidden, mask, **options)


def _run_graphed(
    adapter,
    heads: ExitHeads,
    policy: ExitPolicy,
    backend: Backend,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    batches: StaticBatches,
    mask_summary: tuple[torch.Tensor, int, int] | None = None,
    capture: bool | None = None,
    inputs_serial: int | None = None,
    align_unpadded: bool = False,
) -> ExitResult:
    """:func:`~earlyexit_kernels.engine.step.batch_loop.run_early_exit` (inference, without ``all_exits``)
    as the graphed step: the same ``logits``, ``exit_layer`` and ``layers_run``.

    Shapes: ``hidden`` [B, S, H] (the embeddings' output), ``mask`` [B, S] or None; the result's ``logits`` [B, C],
    ``exit_layer`` and ``layers_run`` [B].
    ``batches``: where the buffers of each shape are kept between forwards (the patched model's),
    with the bucket plan.
    ``capture``: each (layer, bucket) step in a CUDA graph (default: on CUDA without grad).
    ``inputs_serial``: where ``hidden``, ``mask`` and ``mask_summary``'s extents are a prologue's fixed
    buffers (:mod:`~earlyexit_kernels.engine.graphed.prologue`), its serial: the load into the static
    batch is then a captured step too.
    ``align_unpadded``: on CUDA, an unpadded batch at a length off the step masked so that its length rounds up
    (:func:`masked_to_step`): the stream engines' (a server's single texts would otherwise capture graphs for
    every length met); not the model's own forward, whose unpadded batches keep the unpatched model's shapes
    and bits when nobody exits.
    """
    check_graphed_policy(policy)
    num_layers, num_labels = adapter.num_layers, adapter.num_labels
    batch, in_length, hidden_size = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    out_dtype = output_dtype(dtype, device)
    wide = torch.float64 if out_dtype == torch.float64 else torch.float32
    on_gpu = device.type == "cuda"
    sizes, lag = batches.plan(device.type)
    capture = resolve_capture(capture, device)
    result = ExitResult(None, None, None)
    if batch == 0:
        return empty_result(result, num_labels, out_dtype, device)

    scheduled_counts, read_backs = scheduled_exit_counts(policy, num_layers)
    result.host_syncs += read_backs
    length_multiple = getattr(adapter, "length_multiple", 1)
    mask, extents, kept = kept_inputs(mask, mask_summary, in_length, result, length_multiple)
    length_step = math.lcm(CUDA_LENGTH_STEP, length_multiple)
    if on_gpu and align_unpadded and inputs_serial is None:  # (a prologue's load reads fixed buffers)
        mask, extents = masked_to_step(mask, extents, batch, kept, length_step, device)
    # On a GPU the length is rounded up (masked positions) so that batches of mixed lengths share shapes.
    seq_len = -(-kept // length_step) * length_step
    seq_len = seq_len if mask is not None and on_gpu else kept

    state_shapes = batches.state_shapes(policy, adapter, batch, dtype)
    # Not the length: a static batch's buffers hold every length up to the longest it has met.
    key = (backend.name, str(device), dtype, mask is not None, mask.dtype if mask is not None else None)
    key += (id(adapter), type(policy).__name__, weights_fingerprint(heads, adapter))
    first_bucket = bucket_for(batch, sizes)
    static = batches.get(
        key,
        first_bucket,
        state_shapes,
        seq_len,
        lambda rows, longest: StaticBatch(
            BatchShape(rows, longest, hidden_size, num_labels, num_layers, dtype, wide, device),
            mask=mask,
            state=state_shapes,
            stats=batches.stats,
        ),
    )
    halting_head = heads.halting_head(policy)
    fused, pooled_heads = static_heads(static, batches.head_kernels, backend, adapter, device, halting_head)
    # The CPU's plan (exact counts, read at once) also trims the padding nobody left needs, as
    # the exact step does: the same shapes, hence its bits. Fixed buckets keep the length.
    trims = sizes is None and lag == 0 and mask is not None
    step = GraphedStep(adapter, backend, policy, halting_head, fused, pooled_heads, dtype, batches.dead_fill, trims)
    length = seq_len
    # Scheduled says on the host who leaves where: its counts pick each bucket at once, with no
    # lag and no read-back, so no layer runs on rows that have already left.
    known = _known_survivors(scheduled_counts, batch, num_layers)
    with static.lock:
        if static.done_recorded:
            torch.cuda.current_stream(device).wait_event(static.done)
        static.forget_other_policy(policy)
        static.use_length(seq_len)
        template = static.template(policy, adapter, batch, first_bucket)
        load_rows = functools.partial(load, static, Loaded(hidden, mask, extents, kept), template, batch, first_bucket)
        if inputs_serial is not None:  # a prologue's buffers: the load reads fixed addresses, so it is captured
            load_key = ("load", inputs_serial, template.serial, batch, in_length, kept, seq_len, first_bucket)
            if load_key not in static.graphs:
                _forget_stale_loads(static, batches.prologues.serials())
            step_graphs.run_step(static.graphs, load_key, load_rows, capture)
        else:
            load_rows()
        survivors = SurvivorLag(batch, lag=0 if known is not None else lag, sizes=sizes)
        for layer in range(1, num_layers + 1):
            bucket = survivors.bucket_before(layer)
            if bucket == 0:
                break
            may_exit = layer == num_layers or (
                can_exit_before_last(policy, layer) and (scheduled_counts is None or scheduled_counts[layer] > 0)
            )
            run_step = functools.partial(layer_step, step, static, layer, bucket, may_exit, length)
            with _marked("eek_first_layer" if layer == 1 else None):
                step_graphs.run_step(static.graphs, (layer, bucket, may_exit, length), run_step, capture)
            if may_exit and layer < num_layers:
                survivors.publish(
                    layer, survivor_count(static, layer) if known is None else ReadyCount(lambda n=known[layer]: n)
                )
                if trims:
                    longest = int(static.longest_view[layer])  # host memory: the CPU's step has run
                    length = kept_length(longest, length, length_multiple)
        finish_forward(static, result, batch, out_dtype, capture)
    result.buckets = survivors.buckets
    return result


def masked_to_step(mask, extents, batch: int, kept: int, step: int, device) -> tuple:
    """``(mask, extents)`` of a batch of ``kept`` positions: as they are, but where nothing is padded (``mask``
    None) and ``kept`` is not a multiple of ``step``, a mask of ones and full extents, so that the length is
    rounded up to the step as a padded batch's is. Unpadded batches (one row, rows of one length) otherwise run
    at their exact length, and each length met captures its own graphs of every layer."""
    if mask is not None or kept % step == 0:
        return mask, extents
    ones = torch.ones(batch, kept, dtype=torch.long, device=device)
    return ones, torch.full((batch,), kept, dtype=torch.long, device=device)


def resolve_capture(capture: bool | None, device: torch.device) -> bool:
    """Whether a forward on ``device`` captures its steps: ``capture``, or where None :func:`capture_by_default`."""
    if capture is None:
        capture = capture_by_default(device)
    if capture and device.type != "cuda":
        raise ValueError(f"capture=True needs a CUDA device; the model is on {device.type}")
    return capture


def empty_result(result: ExitResult, num_labels: int, out_dtype: torch.dtype, device) -> ExitResult:
    """``result`` with the outputs of a batch of no rows."""
    result.logits = torch.zeros(0, num_labels, dtype=out_dtype, device=device)
    result.exit_layer = torch.zeros(0, dtype=torch.long, device=device)
    result.layers_run = torch.zeros(0, dtype=torch.long, device=device)
    return result


def finish_forward(static: StaticBatch, result: ExitResult, batch: int, out_dtype: torch.dtype, capture: bool):
    """A forward's last step (under ``static``'s lock): the outputs rounded and packed in one captured step,
    then the caller's copy (one clone) into ``result``, and on a GPU the event the next forward waits for."""
    result.logits, result.exit_layer, result.layers_run = finished_outputs(static, batch, out_dtype, capture)
    if static.done is not None:
        static.done.record()
        static.done_recorded = True


def finished_outputs(static: StaticBatch, batch: int, out_dtype: torch.dtype, capture: bool) -> tuple:
    """``(logits [batch, C], exit_layer [batch], layers_run [batch])`` of the ``batch`` rows of a forward whose layers
    have run: rounded and packed in one captured step, then one clone, the caller's."""
    num_labels = static.logits.shape[1]
    packed = static.outputs(out_dtype)
    outputs = functools.partial(finish, static, packed, batch)
    step_graphs.run_step(static.graphs, ("finish", batch, out_dtype), outputs, capture)
    logits, exit_layer, layers_run = PackedOutputs.views(packed.buffer.clone(), static.capacity, num_labels, out_dtype)
    return logits[:batch], exit_layer[:batch], layers_run[:batch]


def static_heads(static: StaticBatch, head_kernels: str, backend, adapter, device, halting_head) -> tuple:
    """``(fused, pooled heads)`` of a static batch's steps, made at its first forward and kept with it (its key
    holds the backend, adapter and heads' weights): with ``head_kernels`` ``"torch"`` the model's modules, then the
    backend's rule; else the backend's fused head where it can run it, pooled in the same kernel without a
    halting head."""
    if static.heads is None:
        if head_kernels == "torch":
            static.heads = (False, None)
        else:
            fused = can_fuse_head(backend, adapter)
            pooled = pooled_exit_heads(backend, adapter, device, fused) if halting_head is None else None
            static.heads = (fused, pooled)
    return static.heads


def _forget_stale_loads(static: StaticBatch, prologues: set[int]) -> None:
    """Drop the load graphs whose prologue (a serial not in ``prologues``) or start state is no longer
    kept: they read buffers that are gone."""
    templates = {template.serial for template in static.templates.values()}
    static.graphs.forget(lambda k: k[0] == "load" and (k[1] not in prologues or k[2] not in templates))


def _marked(name: str | None):
    """A profiler annotation named ``name`` where a profiler runs (the GPU session's gaps step reads
    what was launched before the first layer's), else nothing."""
    if name is None or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


def capture_by_default(device: torch.device) -> bool:
    """Whether the graphed step captures its steps here: on CUDA without grad, and not under
    autocast, whose cache of cast weights lives only as long as the autocast region (a graph
    captured inside it would replay reading freed copies; PyTorch's CUDA-graph notes)."""
    return device.type == "cuda" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")


def _known_survivors(scheduled_counts: list[int] | None, batch: int, num_layers: int) -> list[int] | None:
    """The rows left after each layer (index 1..L) where the policy's exits are known on the host
    (``Scheduled``: its count of rows leaving at each layer), else None."""
    if scheduled_counts is None:
        return None
    left, known = batch, [batch]
    for layer in range(1, num_layers + 1):
        left -= scheduled_counts[layer]
        known.append(left)
    return known


def survivor_count(static: StaticBatch, layer: int):
    """The survivor count of ``layer`` on its way to the host (:func:`published_count`)."""
    return published_count(static.host_counts, static.count_events, static.host_view, layer)


def published_count(host: torch.Tensor | None, events, view, layer: int):
    """A count of ``layer`` (of :func:`~earlyexit_kernels.engine.graphed.static_buffers.host_side`'s) on its way to the host:
    on a GPU written to pinned memory by the layer's step, behind an event (no wait now); on the CPU already there."""
    if host is None:
        return ReadyCount(lambda: view[layer])
    return PinnedCount(events[layer], view, layer)
