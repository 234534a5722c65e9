"""The packed-token step: a batch's sequences as concatenated tokens, no padding, exits decided on the device.

The graphed step (:mod:`earlyexit_kernels.engine.graphed.static_step`) runs a batch padded to its longest
row; at real lengths (a median of 28 tokens, a tail to 256) half or more of a length-sorted
batch's positions are padding, as many as early exit saves. text-embeddings-inference runs its
batches unpadded: tokens concatenated, ``cu_seqlens`` marking where each sequence starts, the
attention through flash attention's varlen kernel. This step does the same, with early exit:

1. the layer on the ``t`` packed tokens of a token bucket [t, H]: the projections, feed-forward and
   norms token by token, the attention by :mod:`earlyexit_kernels.engine.layers.varlen_attention` (the
   fused varlen kernel in fp16/bf16 on CUDA, else the padded-grid SDPA), the layout rebuilt on the
   device from the rows' lengths;
2. each row's pooled input, one position a row ([n, 1, H]: its [CLS] token, or the mean of its
   tokens where the internal heads pool by mean), through the same heads, policy decision and
   write-back as the graphed step (:func:`~earlyexit_kernels.engine.step.batch_loop.settle_exits`);
3. the survivors' per-row state gathered by the survivor order, as there
   (:func:`~earlyexit_kernels.backends.survivor_gather.gather_survivors`), and then their tokens:
   the new layout from the gathered lengths (a row that left has none), each new token's source
   found on the device. Gathering survivors is cheap here: there is no padding to repack;
4. the rows' and the tokens' counts published for the host, read a layer late on a GPU to pick
   smaller row and token buckets (:class:`~earlyexit_kernels.engine.graphed.buckets.SurvivorLag`, once for each).

Every (layer, row bucket, token bucket, longest) step has fixed shapes and reads nothing back, so
on a GPU each is captured once in a CUDA graph; on the CPU the same step runs uncaptured, the
twin the tests read. The rows' buffers (state, outputs, counts, start states, graphs) are a
:class:`~earlyexit_kernels.engine.graphed.static_buffers.StaticBatch` of one position a row; the tokens
live in two more halves beside it (:class:`TokenBatch`).

What it runs: BERT-style encoder layers (BERT, RoBERTa, XLM-R, ELECTRA:
:func:`~earlyexit_kernels.engine.layers.packed_layer.splits_into_token_parts`) whose model head reads the
first token; the outputs are the padded step's up to the rounding of the attention kernel and of
matrix products over another number of rows (``python_tests/test_token_step.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from earlyexit_kernels.backends.survivor_gather import gather_survivors
from earlyexit_kernels.backends.write_back import WriteBack
from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.buckets import SurvivorLag, bucket_for
from earlyexit_kernels.engine.graphed.static_buffers import BatchShape, StaticBatch, host_side
from earlyexit_kernels.engine.graphed.static_step import (
    StaticBatches,
    empty_result,
    finish_forward,
    published_count,
    resolve_capture,
    static_heads,
    survivor_count,
)
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer, splits_into_token_parts
from earlyexit_kernels.engine.layers.varlen_attention import TokenLayout, attention_for, token_layout
from earlyexit_kernels.engine.step.batch_loop import (
    ExitResult,
    HeadRoute,
    head_and_exit_step,
    heads_run_where_none_exit,
    output_dtype,
    settle_exits,
)
from earlyexit_kernels.engine.step.heads import ExitHeads, weights_fingerprint
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy
from earlyexit_kernels.methods.exit_rules import can_exit_before_last
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["TOKEN_SIZES", "TokenBatch", "run_tokens", "token_refusal"]

# A GPU's token buckets: 256 x 1, 1.5, 2, 3, 4, 6, ... (at most a third more tokens than asked, and
# about 2 buckets per doubling, so that a stream of mixed batches meets few captured shapes); past
# the largest, multiples of 64 (:func:`~earlyexit_kernels.engine.graphed.buckets.bucket_for`).
TOKEN_SIZES = tuple(sorted({256 * 2**k for k in range(13)} | {384 * 2**k for k in range(12)}))


def token_refusal(adapter) -> str | None:
    """Why the packed-token step cannot run ``adapter``'s model, or None where it can."""
    if not hasattr(adapter, "layer_module"):
        return f"{type(adapter).__name__} does not expose its encoder layers"
    for index in range(adapter.num_layers):
        if not splits_into_token_parts(adapter.layer_module(index)):
            return (
                f"encoder layer {index} of {type(adapter.model).__name__} is not a BERT-style layer "
                "(BERT, RoBERTa, XLM-R, ELECTRA: query/key/value, absolute positions)"
            )
    family = type(adapter)
    base = next(klass for klass in family.__mro__ if klass.__name__ == "EncoderAdapterBase")
    if family.pool is not base.pool or family.token_vectors is not base.token_vectors:
        return f"{family.__name__} pools its tokens its own way; the packed step reads the first token"
    return None


class TokenBatch:
    """One shape's buffers: the rows' (:class:`StaticBatch` of one position a row: state, output rows,
    row counts, start states, graphs, lock) and two halves of ``max_length`` packed tokens [T, H], with
    the tokens' counts on their way to the host; ``layers``: the model's layers as token functions.

    ``capacity`` and ``max_length`` (rows and tokens held) and :meth:`fits` are what
    :meth:`StaticBatches.get` grows a kept batch by."""

    def __init__(self, rows: StaticBatch, tokens: int, layers: list[OpByOpLayer]):
        self.rows, self.layers = rows, layers
        self.capacity, self.max_length = rows.capacity, tokens
        hidden = rows.halves[0].hidden
        self.tokens = [hidden.new_zeros(tokens, hidden.shape[-1]) for _ in range(2)]
        self.token_counts = torch.zeros_like(rows.counts)  # the survivors' tokens after each layer
        self.host_tokens, self.token_events, self.host_token_view = host_side(self.token_counts)

    def fits(self, bucket: int, state: dict, tokens: int) -> bool:
        return tokens <= self.max_length and self.rows.fits(bucket, state, 1)


@dataclass
class _TokenStep:
    """What every layer's step of one forward reads besides the buffers."""

    adapter: object
    backend: object
    policy: ExitPolicy
    halting_head: object
    fused: bool
    pooled_heads: list | None
    attend: object  # a varlen attention of :mod:`~earlyexit_kernels.engine.layers.varlen_attention`
    dead_fill: float | None = None  # tests: written over the tokens of no row after every layer


def pooled_rows(adapter, layer: int, out: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """[n, 1, H]: what the heads of 1-based ``layer`` pool of each row, as a row of one position: the
    first token, or (internal heads pooling by mean) the mean of the row's tokens."""
    n = layout.lengths.shape[0]
    if layer < adapter.num_layers and adapter.head_pooling == "mean":
        # summed in float32 for half precision, as masked_mean does; the tokens of no row into row n
        wide = torch.float64 if out.dtype == torch.float64 else torch.float32
        sums = torch.zeros(n + 1, out.shape[1], dtype=wide, device=out.device).index_add_(0, layout.row, out.to(wide))
        return (sums[:n] / layout.lengths.clamp(min=1)[:, None].to(wide)).to(out.dtype)[:, None]
    first = layout.cu[:n].clamp(max=out.shape[0] - 1)  # an empty row's index may be one past the tokens
    return out.index_select(0, first)[:, None]


def _token_layer_step(step: _TokenStep, batch: TokenBatch, layer: int, n: int, t: int, may_exit: bool, longest: int):
    """The step of 1-based ``layer`` on the first ``n`` rows and ``t`` tokens: reads half ``layer % 2`` and
    writes half ``(layer + 1) % 2`` (rows and tokens) and the output rows of the rows that exit. No host read."""
    adapter, static = step.adapter, batch.rows
    src, dst = static.halves[layer % 2], static.halves[(layer + 1) % 2]
    lengths = src.extents[:n]  # a row's extent is its length: its tokens, packed
    layout = token_layout(lengths, t, longest)
    attend = functools.partial(_attend_with, step.attend, layout)
    out = batch.layers[layer - 1].on_tokens(batch.tokens[layer % 2][:t], attend)
    pooled = pooled_rows(adapter, layer, out, layout)
    rows = src.rows[:n]
    state = {k: v[:n] for k, v in src.state.items()}
    pooled_head = step.pooled_heads[layer - 1] if step.pooled_heads is not None and layer < adapter.num_layers else None
    if not may_exit:
        if heads_run_where_none_exit(step.policy, adapter):
            *_, state = head_and_exit_step(
                adapter,
                step.backend,
                step.policy,
                layer,
                pooled,
                step.halting_head,
                state,
                fused=step.fused,
                pooled_head=pooled_head,
            )
        order, exits = static.in_place[:n], static.nobody_exits[:n]
    else:
        target = WriteBack(rows, static.runs[layer, :n], None, static.logits, static.exit_layer, static.layers_run)
        route = HeadRoute(step.fused, step.halting_head, pooled_head)
        exits, state, order, _ = settle_exits(adapter, step.backend, step.policy, layer, pooled, state, target, route)
        if layer == adapter.num_layers:
            return
    sources, targets = [lengths], [dst.extents[:n]]
    for k, v in state.items():
        sources.append(v)
        targets.append(dst.state[k][:n])
    host_count = None if static.host_counts is None or not may_exit else static.host_counts[layer : layer + 1]
    next_rows = dst.rows[:n]
    gather = step.backend.gather_survivors or gather_survivors
    gather(
        order, exits, rows, static.capacity, next_rows, static.counts[layer : layer + 1], sources, targets, host_count
    )
    following = batch.tokens[(layer + 1) % 2][:t]
    if not may_exit:  # every row stays in its place: its tokens too
        following.copy_(out)
        return
    # A row that left has no tokens; each survivor's tokens move to their place in the new packing.
    kept = dst.extents[:n].masked_fill_(next_rows == static.capacity, 0)
    packed = token_layout(kept, t, longest)
    source_row = order.index_select(0, packed.row.clamp(max=n - 1))
    source = torch.where(packed.valid, layout.cu.index_select(0, source_row) + packed.offset, 0)
    torch.index_select(out, 0, source, out=following)
    if step.dead_fill is not None:  # tests: what the tokens of no row hold must never reach a live one
        following.masked_fill_(~packed.valid[:, None], step.dead_fill)
    if batch.host_tokens is None:  # the CPU: the counts are their own host view
        batch.token_counts[layer : layer + 1].copy_(packed.cu[n:])
    else:  # a GPU reads only the pinned copy: one copy, straight there
        batch.host_tokens[layer : layer + 1].copy_(packed.cu[n:], non_blocking=True)


def _attend_with(attention, layout: TokenLayout, q, k, v, scaling: float) -> torch.Tensor:
    return attention(q, k, v, layout, scaling)


def _load_tokens(batch: TokenBatch, hidden, lengths, template, rows: int, bucket: int, tokens: int, longest: int):
    """Put a forward's rows in the first halves (layer 1 reads half 1): each row's ``lengths`` [B] first
    positions of ``hidden`` [B, S, H] packed into ``tokens`` tokens (the rest zeros), its length, its start
    state; dead rows ``rows..bucket`` of length 0. No host read: a CUDA graph holds it."""
    static = batch.rows
    first = static.halves[1]
    first.extents[:rows].copy_(lengths)
    first.extents[rows:bucket].zero_()
    torch.arange(bucket, out=first.rows[:bucket])
    first.rows[rows:bucket].fill_(static.capacity)  # dead: their outputs go to the scratch row
    for k, v in template.state.items():
        first.state[k][:bucket].copy_(v)
    layout = token_layout(first.extents[:bucket], tokens, longest)
    length = hidden.shape[1]
    source = torch.where(layout.valid, layout.row.clamp(max=rows - 1) * length + layout.offset, 0)
    flat = hidden.reshape(rows * length, hidden.shape[2])
    target = batch.tokens[1][:tokens]
    torch.index_select(flat, 0, source, out=target)
    target.masked_fill_(~layout.valid[:, None], 0)
    static.logits.zero_()
    static.exit_layer.zero_()
    static.layers_run.zero_()


@dataclass(frozen=True, slots=True)
class PackedInputs:
    """A batch as the packed step takes it: ``hidden`` [B, S, H] (the embeddings of the padded rows),
    ``lengths`` [B] int64 on the device (each row's valid positions, first in its row), and on the host
    the ``longest`` length and the ``tokens`` in all."""

    hidden: torch.Tensor
    lengths: torch.Tensor
    longest: int
    tokens: int


def run_tokens(adapter, heads: ExitHeads, policy: ExitPolicy, backend, inputs: PackedInputs, **options) -> ExitResult:
    """:func:`_run_tokens` with the model's device the current CUDA device (:func:`step_graphs.on_device`)."""
    with step_graphs.on_device(inputs.hidden.device):
        return _run_tokens(adapter, heads, policy, backend, inputs, **options)


def _run_tokens(
    adapter,
    heads: ExitHeads,
    policy: ExitPolicy,
    backend,
    inputs: PackedInputs,
    *,
    batches: StaticBatches,
    capture=None,
) -> ExitResult:
    """Early exit on packed tokens: ``logits`` [B, C], ``exit_layer`` and ``layers_run`` [B], as the graphed
    step's for the same rows, and ``buckets`` (each layer's row bucket) and ``token_buckets``.

    ``batches``: where the buffers are kept (the patched model's, beside the graphed step's); its row
    sizes and lag are the graphed step's plan. ``capture``: each step in a CUDA graph (default: on CUDA
    without grad)."""
    check_graphed_policy(policy)
    reason = token_refusal(adapter)
    if reason is not None:
        raise ValueError(f"the packed-token step cannot run this model: {reason}. Use the cohort engine")
    hidden = inputs.hidden
    batch, device, dtype = hidden.shape[0], hidden.device, hidden.dtype
    num_layers, num_labels = adapter.num_layers, adapter.num_labels
    out_dtype = output_dtype(dtype, device)
    wide = torch.float64 if out_dtype == torch.float64 else torch.float32
    capture = resolve_capture(capture, device)
    result = ExitResult(None, None, None)
    if batch == 0:
        return empty_result(result, num_labels, out_dtype, device)
    sizes, lag = batches.plan(device.type)
    token_sizes = TOKEN_SIZES if sizes is not None else None
    longest = inputs.longest
    if device.type == "cuda":
        # A bound, not the length: the fused kernel launches blocks up to it (the extra ones return at once),
        # the grid pads to it. A power of two (32 at least) keeps the captured shapes few.
        longest = max(32, 1 << (longest - 1).bit_length())
    state_shapes = batches.state_shapes(policy, adapter, batch, dtype)
    key = ("tokens", backend.name, str(device), dtype, id(adapter), type(policy).__name__)
    key += (weights_fingerprint(heads, adapter),)
    first_bucket, first_tokens = bucket_for(batch, sizes), bucket_for(inputs.tokens, token_sizes)

    def make(capacity: int, tokens: int) -> TokenBatch:
        shape = BatchShape(capacity, 1, adapter.hidden_size, num_labels, num_layers, dtype, wide, device)
        static = StaticBatch(shape, mask=None, state=state_shapes, stats=batches.stats)
        layers = [OpByOpLayer(adapter.layer_module(index)) for index in range(num_layers)]
        return TokenBatch(static, tokens, layers)

    token_batch = batches.get(key, first_bucket, state_shapes, first_tokens, make)
    static = token_batch.rows
    halting_head = heads.halting_head(policy)
    fused, pooled_heads = static_heads(static, batches.head_kernels, backend, adapter, device, halting_head)
    attend = attention_for(device, dtype, token_batch.layers[0].head_size)
    step = _TokenStep(adapter, backend, policy, halting_head, fused, pooled_heads, attend, batches.dead_fill)
    with static.lock:
        if static.done_recorded:
            torch.cuda.current_stream(device).wait_event(static.done)
        static.forget_other_policy(policy)
        template = static.template(policy, adapter, batch, first_bucket)
        # the load reads the caller's tensors, at new addresses each forward: run, not captured
        _load_tokens(token_batch, hidden, inputs.lengths, template, batch, first_bucket, first_tokens, longest)
        survivors = SurvivorLag(batch, lag=lag, sizes=sizes)
        tokens_left = SurvivorLag(inputs.tokens, lag=lag, sizes=token_sizes)
        for layer in range(1, num_layers + 1):
            bucket, token_bucket = survivors.bucket_before(layer), tokens_left.bucket_before(layer)
            if bucket == 0:
                break
            may_exit = layer == num_layers or can_exit_before_last(policy, layer)
            run_step = functools.partial(
                _token_layer_step, step, token_batch, layer, bucket, token_bucket, may_exit, longest
            )
            step_graphs.run_step(
                static.graphs, ("tokens", layer, bucket, token_bucket, may_exit, longest), run_step, capture
            )
            if may_exit and layer < num_layers:
                survivors.publish(layer, survivor_count(static, layer))
                tokens_left.publish(
                    layer,
                    published_count(
                        token_batch.host_tokens, token_batch.token_events, token_batch.host_token_view, layer
                    ),
                )
        finish_forward(static, result, batch, out_dtype, capture)
    result.buckets = survivors.buckets
    result.token_buckets = tokens_left.buckets
    return result
