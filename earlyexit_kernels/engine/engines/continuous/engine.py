"""The continuous early-exit engine: one queue per layer, layer calls refilled across batches.

(Past 600 lines: one runner whose parts share its slots, kept outputs and pool on every call;
the admission order, the scheduling and packing rules and their defaults live elsewhere.)

Sequences are submitted as token ids; the engine embeds them, runs the layer calls that
:class:`earlyexit_kernels.engine.engines.continuous.scheduler.LayerScheduler` hands it, and returns each sequence
as it exits. It executes, it does not decide: the exit rule of every layer is the
per-batch engine's (:func:`earlyexit_kernels.engine.step.batch_loop.head_and_exit_step` on the model's
backend), the choice of layer, rows and shape is the scheduler's.

What a sequence in flight holds, on the device:

- its hidden states, in a paged token pool (:mod:`earlyexit_kernels.engine.engines.continuous.token_pool`), so
  memory follows the tokens in flight, not ``max_in_flight x max_length``, or in the output of
  a recent layer call, which the engine keeps (a few, see ``KEPT_OUTPUTS``) so that the rows
  of a call that go on are not written to the pool and gathered back; a layer call gathers
  its rows into ``[padded_rows, padded_length, H]``, each from where it is;
- its policy state (the per-batch engine's state, one row per slot).

On the host: its length, pages, layers run, and the next layer it must run. A layer
call reads back once: for each real row whether it exited, its logits, and (SkipGates)
the next layer it runs, every layer its gates skip going by without a call. Layers
where the policy cannot exit read nothing back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import torch

from earlyexit_kernels.engine.engines.continuous.call_graphs import StaticCalls
from earlyexit_kernels.engine.engines.continuous.scheduler import (
    Admit,
    LayerScheduler,
    PackingRule,
    ShapeBuckets,
    default_call_cost,
    default_length_step,
    default_max_in_flight,
)
from earlyexit_kernels.engine.engines.continuous.token_pool import TokenPool
from earlyexit_kernels.engine.layers.module_weights import float_bias, float_weight
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer, has_forward_hooks, splits_into_token_parts
from earlyexit_kernels.engine.step.batch_loop import (
    can_fuse_head,
    head_and_exit_step,
    output_dtype,
    pooled_exit_heads,
    round_keeping_argmax,
)
from earlyexit_kernels.engine.step.start_state import start_state
from earlyexit_kernels.engine.stream.aging import default_max_age
from earlyexit_kernels.engine.stream.engine_config import EngineChoice, EngineConfig, engine_config
from earlyexit_kernels.engine.stream.stream_surface import (
    EngineStats,
    Finished,
    StreamSurface,
)
from earlyexit_kernels.methods.exit_rules import can_exit_before_last
from earlyexit_kernels.methods.policies import SkipGates

__all__ = ["ContinuousEngine"]

# Outputs of recent layer calls kept out of the pool, their rows read from them by later calls: the
# survivors of an exit wait a few calls for their next layer, and written to the pool and gathered
# back they cost two copies. At most this many, holding at most as many states as the pool.
KEPT_OUTPUTS = 16
# Most rows per layer call where max_batch_size is None.
DEFAULT_ROWS = 64


class ContinuousEngine(StreamSurface):
    """Run a patched model's early exit over a stream of sequences with per-layer refill.

    The limits below come as one :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`
    (``config``, as ``eek.classify`` and the server build it once) or as keyword arguments of the
    same names, not both. ``max_batch_size``: most rows per layer call. ``max_tokens``: most rows x padded
    length per layer call (None: no limit). ``max_length``: longest sequence accepted
    (default: what the model's position embeddings hold). Shapes: eager calls run their
    exact rows and lengths; with ``compile`` they come from fixed sets (row counts 1, 2,
    4, ..., lengths in steps of ``length_step``, default 8), one graph each.
    ``length_step`` given without ``compile``: eager lengths padded to its multiples too.
    ``packed``: run a layer call's token-wise parts on its real tokens only
    (:mod:`earlyexit_kernels.engine.layers.packed_layer`; BERT-style layers, eager): ``None`` (default)
    where real tokens are under ``PACK_BELOW_FILL`` of the call's positions, ``True`` on every
    call with padding, ``False`` never. Eager BERT-style layers run op by op on the modules'
    weights either way (the layer's own arithmetic, bit for bit, without its modules' Python).
    ``call_cost``: what a layer call costs beyond its tokens, in tokens, for the
    scheduler's merges (default ``32 * (128 / hidden_size) ** 2``, measured on a CPU).
    ``max_in_flight``: most sequences embedded at a time
    (default ``16 * max_batch_size``; memory is the tokens in flight, see the module
    docstring). ``max_wait``: layer calls after which a waiting row is served first
    (default ``4 * num_layers * max_in_flight // max_batch_size``). ``compile``: run
    every layer call through ``torch.compile`` (``True``, or a dict of its options).
    ``admission``: which pending sequences enter first: ``"fifo"`` (arrival order, for
    serving) or ``"length"`` (a sweep over lengths, ascending and wrapping around, for
    throughput: sequences that enter together have similar lengths, so calls pad less; a
    pending sequence waits at most two sweeps, each of at most ``max_length`` admissions).
    ``max_age``: layer calls after its submission from which a sequence is served first,
    pending or in flight, whatever the order (bounded waiting, :mod:`earlyexit_kernels.engine.stream.aging`):
    ``"auto"`` (default) ``2 * num_layers``, None off (``eek.classify``: throughput first).

    ``submit`` queues sequences; each ``step`` embeds new ones or runs one layer call and
    returns the sequences that exited.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, choice: EngineChoice | None = None, **limits):
        # the model's record (its adapter rebuilt if the model was quantized since), policy, device, backend, queue
        _, step = self._open(model, engine_config(config, limits), "the continuous engine", choice)
        config = self.config
        max_batch_size, max_tokens, max_length = (
            config.max_batch_size or DEFAULT_ROWS,
            config.max_tokens,
            self.max_length,
        )
        length_step, max_in_flight, compile = config.length_step, config.max_in_flight, config.compile
        call_cost, packed, max_age = config.call_cost, config.packed, config.max_age
        hidden_size = self.adapter.hidden_size
        self._on_cpu = self.device.type == "cpu"  # read per call: a plain bool, no torch.device attribute
        # The model's step (eek.patch's step=): graphed calls run as static steps, captured in CUDA
        # graphs on CUDA (engine/engines/continuous/call_graphs.py); torch.compile, when asked for, runs instead.
        self.graphed = not compile and step == "graphed"
        # Fixed shapes buy something only where a graph is reused (torch.compile, CUDA graphs);
        # eager calls run their exact rows and lengths.
        fixed_shapes = bool(compile) or self.graphed
        self._fixed_shapes = fixed_shapes
        if length_step is None:
            length_step = default_length_step(fixed_shapes)
        self.buckets = ShapeBuckets(
            max_batch_size, max_length, min(length_step, max_length), max_tokens, bucket_rows=fixed_shapes
        )
        if max_in_flight is None:
            max_in_flight = default_max_in_flight(max_batch_size)
        if call_cost is None:
            call_cost = default_call_cost(hidden_size)
        if max_age == "auto":
            max_age = default_max_age(self.num_layers)
        self.scheduler = LayerScheduler(
            self.num_layers, self.buckets, max_in_flight, config.max_wait, call_cost, max_age
        )

        # Slots: one per sequence in flight, plus the last one for pad rows (length 0: all padding).
        slots = max_in_flight + 1
        self._free_slots = list(range(max_in_flight - 1, -1, -1))
        self._pad_slot = max_in_flight
        self._tokens = TokenPool(
            slots, max_length, hidden_size, self.dtype, self.device, fast=self.backend.name == "cpp"
        )
        self._lengths = self._tokens.lengths  # the slots' lengths, set as they are taken
        self._row_lengths = [0] * slots  # the same as Python ints: summed and passed on at every call
        self._runs = [0] * slots
        self._admitted_at = [0.0] * slots  # time.perf_counter() of each slot's admission
        self._in_calls = [0.0] * slots  # seconds each slot's sequence has spent in layer calls since
        self._keys: list[object] = [None] * slots
        with torch.no_grad():
            template = start_state(self.policy, self.adapter, 1, self.device, self.dtype)
        self._state = {k: v.expand(slots, *v.shape[1:]).clone() for k, v in template.items()}
        self._state_template = template
        self._halting_head = self.heads.halting_head(self.policy)
        # per 1-based layer: whether a row can exit there (else the call reads nothing back)
        self._may_exit = [False] + [
            layer == self.num_layers or can_exit_before_last(self.policy, layer)
            for layer in range(1, self.num_layers + 1)
        ]
        self._gates = None
        if isinstance(self.policy, SkipGates):
            gates = self.heads.gates
            self._gates = (
                torch.cat([float_weight(g) for g in gates]),  # [L, H]: gate i is read before layer i + 1
                torch.cat([float_bias(g) for g in gates]),  # (dequantized where the gates are quantized)
            )
        self._residents: list[_Resident] = []  # outputs of recent calls, oldest first (see _keep)
        self._held: dict[int, tuple[_Resident, int]] = {}  # slot -> the kept output and row holding its states
        self._fused: bool | None = None  # whether the backend runs the heads fused, decided at the first call
        self._prepared: list = []  # per layer, the backend's prepared head step or None (at the first call)
        self._run_layer = self.adapter.run_layer
        self.compiled = bool(compile)
        if compile and not getattr(self.adapter, "layer_call_is_module_call", True):
            raise ValueError(
                f"compile=True compiles one encoder layer module called as layer(hidden, mask); "
                f"{type(model).__name__}'s layers need more arguments: leave compile off"
            )
        if compile:
            options = compile if isinstance(compile, dict) else {}
            self._run_layer = _compiled_layer_call(self.adapter, options)

        packable = not fixed_shapes and all(
            getattr(self.adapter, "layer_call_is_module_call", True)
            and splits_into_token_parts(self.adapter.layer_module(index))
            for index in range(self.num_layers)
        )
        if packed and not packable:
            raise ValueError(
                "packed=True runs BERT-style layers (attention.self.query/key/value, intermediate, output) "
                f"eagerly; {type(model).__name__}'s layers are not split so"
                + (" and compile is on" if compile else "")
                + (" and the model runs the graphed step (fixed shapes)" if self.graphed else "")
                + ": leave packed at None"
            )
        self._packing = PackingRule.choose(packable, packed)
        self._op_by_op = packable  # calls not packed run op by op too: the layer's own arithmetic, less Python
        self._additive_mask = packable and self._on_cpu
        # SDPA's values for an attended and a masked key, in the model's dtype
        self._attended = torch.zeros((), dtype=self.dtype, device=self.device)
        self._masked = torch.full((), -math.inf, dtype=self.dtype, device=self.device)
        self._op_layers: list[OpByOpLayer | None] = [None] * self.num_layers
        self._run_packed_layer = self._packed_layer_call

        self._calls = None  # the graphed step's buffers and graphs, made at the first call
        self.stats = EngineStats()

    # ------------------------------------------------------------------ submission

    def cancel(self, keys) -> int:
        """Drop the sequences with these keys, pending or in flight (e.g. their client went away).

        Call between steps. Returns how many were found.
        """
        keys = set(keys)
        dropped = self._pending.remove(keys)
        slots = [slot for slot, key in enumerate(self._keys) if key is not None and key in keys]
        self.scheduler.discard(slots)
        self._free(slots)
        return dropped + len(slots)

    @property
    def calls_made(self) -> int:
        return self.scheduler.calls

    @property
    def max_age(self) -> int | None:
        """The bounded-waiting rule's layer calls, ``"auto"`` resolved (None: no age rule)."""
        aging = self.scheduler.aging
        return None if aging is None else aging.max_age

    @property
    def max_batch_size(self) -> int:
        """Most rows per layer call."""
        return self.buckets.max_batch_size

    @property
    def max_in_flight(self) -> int:
        """Most sequences embedded at a time."""
        return self.scheduler.max_in_flight

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight

    @property
    def idle(self) -> bool:
        return not self._pending and self.scheduler.in_flight == 0

    def set_policy(self, policy) -> None:
        """Decide exits with ``policy`` from the next layer call on: a threshold moved along a certified path
        (:mod:`earlyexit_kernels.calibration.online`). Same family and per-sequence state as the
        policy served (a sequence in flight takes the new thresholds at its next layer); call between steps."""
        self.check_policy(policy)
        self.policy = policy
        self._may_exit = [False] + [
            layer == self.num_layers or can_exit_before_last(policy, layer) for layer in range(1, self.num_layers + 1)
        ]
        self._fused, self._prepared = None, []  # the prepared head steps hold the thresholds: made again
        self._calls = None  # and so do the graphed calls' captured graphs

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Embed new sequences or run one layer call; returns the sequences that exited."""
        aging = self.scheduler.aging
        oldest = self._pending.oldest() if aging is not None else None
        action = self.scheduler.decide(bool(self._pending), oldest)
        if action is None:
            return []
        if isinstance(action, Admit):
            overdue_from = self.scheduler.calls - aging.max_age if aging is not None else None
            self._admit(self._pending.take(action.count, overdue_from))
            return []
        return self._run_call(action)

    # ------------------------------------------------------------------ internals

    def _admit(self, sequences: list[tuple]) -> None:
        # Embed in length-sorted chunks of at most max_batch_size rows, each padded to its longest;
        # the host tables of a chunk are filled with a few numpy operations, not per sequence.
        sequences = sorted(sequences, key=itemgetter(0))  # entries of _pending; stable: ties keep their order
        lengths = np.fromiter((entry[0] for entry in sequences), dtype=np.int64, count=len(sequences))
        admitted = self._free_slots[-len(sequences) :][::-1]  # the order pop() would give
        del self._free_slots[-len(sequences) :]
        self._tokens.take(admitted, lengths)  # one growth of the pool for the whole admission
        now = time.perf_counter()
        for slot, entry in zip(admitted, sequences):
            self._admitted_at[slot] = now
            self._in_calls[slot] = 0.0
            self.stats.queue_seconds.observe(now - entry[6])
        size = self.buckets.max_batch_size
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            k = len(chunk)
            slots, chunk_lengths = admitted[start : start + k], lengths[start : start + k]
            longest = int(chunk_lengths[-1])
            valid = np.arange(longest) < chunk_lengths[:, None]
            ids = np.full((k, longest), self.pad_token_id, dtype=np.int64)
            ids[valid] = np.concatenate([entry[3] for entry in chunk])
            types = np.zeros((k, longest), dtype=np.int64)
            if any(entry[4] is not None for entry in chunk):
                types[valid] = np.concatenate(
                    [entry[4] if entry[4] is not None else np.zeros_like(entry[3]) for entry in chunk]
                )
            for slot, entry in zip(slots, chunk):
                self._runs[slot] = 0
                self._row_lengths[slot] = entry[0]
                self._keys[slot] = entry[2]
            valid_mask = torch.from_numpy(valid.astype(np.int64)).to(self.device)
            hidden = self.adapter.embed(
                torch.from_numpy(ids).to(self.device), torch.from_numpy(types).to(self.device), None, None, valid_mask
            )
            self._tokens.scatter(slots, hidden)
            if self._state:
                slot_index = torch.tensor(slots, device=self.device)
                for key, value in self._state.items():
                    value.index_copy_(0, slot_index, self._state_template[key].expand(k, *value.shape[1:]))
        self.scheduler.admit(admitted, lengths.tolist(), [entry[5] for entry in sequences])
        self.stats.admitted += len(sequences)

    def _run_call(self, call) -> list[Finished]:
        started = time.perf_counter()
        finished = self._layer_call(call, started)
        elapsed = time.perf_counter() - started
        in_calls = self._in_calls
        for slot in call.rows:  # those that left too: their slot's count starts anew at its next admission
            in_calls[slot] += elapsed
        return finished

    def _layer_call(self, call, started: float) -> list[Finished]:
        """One layer call's work (``started``: its ``time.perf_counter()``, for the exits' ``in_calls``)."""
        layer, n = call.layer, len(call.rows)
        inputs = self._call_inputs(call)
        hidden, mask, slot_index = inputs.hidden, inputs.mask, inputs.slot_index
        state = {k: v.index_select(0, slot_index) for k, v in self._state.items()}
        if self._fused is None:  # once, inside the first step (no grad): it reads every head's weights
            self._fused = can_fuse_head(self.backend, self.adapter)
            self._prepared = self._prepared_head_steps()
        if self.graphed:
            hidden, exits, returned, state = self._static_calls().run(layer, hidden, mask, state, self._layer_and_head)
            self._tokens.scatter(list(call.rows) + [-1] * (call.padded_rows - n), hidden)
        else:
            if inputs.layer_mask is None:
                inputs.layer_mask = self._layer_mask(mask)
            if mask is not None and self._packing.packs(inputs.tokens, mask.numel()):
                if inputs.positions is None:
                    valid = np.arange(call.padded_length) < self._lengths[list(call.rows)][:, None]
                    inputs.positions = torch.from_numpy(np.flatnonzero(valid)).to(self.device)
                hidden = self._run_packed_layer(layer - 1, hidden, inputs.positions, inputs.layer_mask)
            elif self._op_by_op:
                hidden = self._run_packed_layer(layer - 1, hidden, None, inputs.layer_mask)
            else:
                hidden = self._run_layer(layer - 1, hidden, inputs.layer_mask)
            if self._fixed_shapes:
                self._tokens.scatter(list(call.rows) + [-1] * (call.padded_rows - n), hidden)
            else:  # kept where it is: the next calls read its rows from it
                self._keep(hidden, list(call.rows), inputs)
            exits, returned, state = self._head_step(layer, hidden, mask, state)
        if self._state:
            real = slot_index[:n]
            for key, value in self._state.items():
                value.index_copy_(0, real, state[key][:n])
        for slot in call.rows:
            self._runs[slot] += 1
        self.stats.record_call(call, inputs.tokens)

        next_layer = None
        if self._gates is not None and layer < self.num_layers:
            next_layer = self._next_run_layer(hidden[:n, 0], layer)
        if not self._may_exit[layer] and next_layer is None:
            self.scheduler.advance(call)
            return []

        # The one read-back of the call (on the CPU the outputs are read where they are).
        wire = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.stats.host_syncs += 1
        table = None
        if self._on_cpu:
            # One conversion to Python values: right after a layer every numpy or torch call runs
            # on cold caches (tens of microseconds each), while the interpreter's own loop stays warm.
            exited = exits.tolist()[:n]
            next_layers = next_layer.numpy().tolist() if next_layer is not None else None
        else:
            columns = [exits[:n, None], returned[:n]]
            if next_layer is not None:
                columns.append(next_layer[:, None])
            table = torch.cat([c.to(wire) for c in columns], dim=1).cpu().numpy()
            exited = (table[:, 0] > 0).tolist()
            next_layers = table[:, -1].astype(np.int64).tolist() if next_layer is not None else None
        if not any(exited) and (next_layers is None or all(target == layer + 1 for target in next_layers)):
            self.scheduler.advance(call)  # every row goes on to the next layer
            return []
        logits = returned[:n] if table is None else torch.from_numpy(table[:, 1 : 1 + self.num_labels])
        out_dtype = output_dtype(self.dtype, self.device)  # the autocast dtype inside autocast, as the model
        leaving = [row for row, left in enumerate(exited) if left]
        if logits.dtype == out_dtype:
            by_row = logits.unbind(0)  # one call for the rows' views, not one indexing each
            exiting = {row: by_row[row] for row in leaving}
        else:
            # Rounded to the model dtype on the host, once for the rows that exit, keeping each row's argmax
            # (as the per-batch engine does: Voting's tie-broken log-scores can round to equal values).
            if len(leaving) < n:
                logits = logits[torch.tensor(leaving, dtype=torch.long)]
            exiting = dict(zip(leaving, round_keeping_argmax(logits.to(wire), out_dtype).unbind(0)))
        finished, gone = [], []
        survivors: dict[int, list[int]] = {}  # next layer -> slots
        keys, runs = self._keys, self._runs
        now = time.perf_counter()
        for row, slot in enumerate(call.rows):
            out = exiting.get(row)
            if out is not None:
                in_calls = self._in_calls[slot] + (now - started)
                finished.append(Finished(keys[slot], out, layer, runs[slot], self._admitted_at[slot], in_calls))
                gone.append(slot)
                self.stats.inference_seconds.observe(now - self._admitted_at[slot])
            else:
                target = layer + 1 if next_layers is None else next_layers[row]
                survivors.setdefault(target, []).append(slot)
        self._release(gone)
        for target, slots in survivors.items():
            self.scheduler.requeue_many(slots, target, [self._row_lengths[slot] for slot in slots])
        return finished

    def _head_step(self, layer: int, hidden: torch.Tensor, mask, state: dict) -> tuple:
        """The exit head and decision of ``layer`` on a call's output: ``(exits, returned, state)``."""
        prepared = self._prepared[layer - 1]
        if prepared is not None:
            return prepared(hidden, mask, state)
        exits, returned, _, _, state = head_and_exit_step(
            self.adapter,
            self.backend,
            self.policy,
            layer,
            hidden,
            self._halting_head,
            state,
            fused=self._fused,
            mask=mask,
        )
        return exits, returned, state

    def _layer_and_head(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor, state: dict) -> tuple:
        """A graphed call's step: the layer (its mask built inside), then the head and decision."""
        out = self._run_layer(layer - 1, hidden, self._layer_mask(mask))
        exits, returned, state = self._head_step(layer, out, mask, state)
        return out, exits, returned, state

    def _static_calls(self) -> StaticCalls:
        if self._calls is None:
            wide = torch.float64 if self.dtype == torch.float64 else torch.float32
            # not under autocast: a captured graph would read the cast weights its region frees
            capture = (
                self.device.type == "cuda" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
            )
            # Normal tensors even under inference_mode(): a later call under no_grad() writes them in place.
            with torch.inference_mode(False):
                self._calls = StaticCalls(
                    rows=self.buckets.max_batch_size,
                    length=self.buckets.padded_length(self.max_length),
                    hidden_size=self.adapter.hidden_size,
                    num_labels=self.num_labels,
                    dtype=self.dtype,
                    wide=wide,
                    device=self.device,
                    state=self._state,
                    capture=capture,
                )
        return self._calls

    def _layer_mask(self, mask: torch.Tensor | None):
        """The layers' mask for a call's 2-D mask [n, S]. For SDPA on the CPU, the additive float mask
        SDPA would make of the boolean one at every layer (0 where a key is attended, -inf where not,
        in the model's dtype: the same values), made once: the calls of a cohort's next layers share it."""
        layer_mask = self.adapter.layer_mask(mask, self.dtype)
        if (
            self._additive_mask
            and layer_mask is not None
            and layer_mask.dtype == torch.bool
            and self.adapter.attn_implementation == "sdpa"
            and not torch.is_autocast_enabled("cpu")  # SDPA's mask is then in the autocast dtype
        ):
            # From the boolean mask's one row of keys per sequence [n, 1, 1, S], broadcast over the
            # queries as it is.
            keys = layer_mask[:, :, :1, :]
            layer_mask = torch.where(keys, self._attended, self._masked).expand(layer_mask.shape)
        return layer_mask

    def _prepared_head_steps(self) -> list:
        """Per layer, the backend's head and exit step with its weights made ready, as a function
        ``(hidden [n, S, H], mask [n, S] or None, state) -> (exits, returned, state)``, or None (the
        last layer, which runs the model's own head; halting heads; backends without one)."""
        prepare = self.backend.prepare_head_exit_step
        steps = [None] * self.num_layers
        if self._halting_head is not None:
            return steps
        if self._fused and prepare is not None:
            for layer in range(1, self.num_layers):
                step = prepare(self.policy, layer, self.num_layers, *self.adapter.head_weights(layer))
                if step is not None:
                    steps[layer - 1] = _on_pooled_rows(step, self.adapter)
        pooled_heads = pooled_exit_heads(self.backend, self.adapter, self.device, self._fused)
        if pooled_heads is not None:
            for layer, head in enumerate(pooled_heads, start=1):
                if steps[layer - 1] is None and head is not None:
                    steps[layer - 1] = _pooled_step(self.backend, self.policy, layer, self.num_layers, head)
        return steps

    def _packed_layer_call(self, index: int, hidden: torch.Tensor, positions: torch.Tensor | None, layer_mask):
        """Layer ``index`` op by op (:class:`OpByOpLayer`; packed at ``positions``, or on every
        position), or through its module where forward hooks are registered (they must run)."""
        layer = self._op_layers[index]
        if layer is None:  # read once: the engine lives for one stream of one model
            layer = self._op_layers[index] = OpByOpLayer(self.adapter.layer_module(index))
        if has_forward_hooks(layer.layer):
            return self._run_layer(index, hidden, layer_mask)
        self.stats.packed_calls += positions is not None
        return layer(hidden, positions, layer_mask)

    def _next_run_layer(self, cls_hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """SkipGates: the next layer each row runs after ``layer``; layers whose gate skips go by."""
        last = self.num_layers
        if layer + 1 >= last:
            return torch.full((cls_hidden.shape[0],), last, device=cls_hidden.device)
        weight, bias = self._gates
        # Gates of layers layer + 1 .. L - 1 on the same [CLS] state: a skipped layer leaves it as it is.
        gates = torch.sigmoid(torch.nn.functional.linear(cls_hidden, weight[layer : last - 1], bias[layer : last - 1]))
        runs = gates.float() < self.policy.skip_threshold
        first = torch.where(runs.any(dim=1), runs.int().argmax(dim=1) + layer + 1, last)
        return first

    def _call_inputs(self, call) -> _CallInputs:
        """What a layer call reads: the last call's output and inputs where it runs the same rows;
        else each row from the earlier output that holds it, or from the pool."""
        n = len(call.rows)
        rows = list(call.rows)
        held = self._held
        newest = self._residents[-1] if self._residents else None
        if (
            newest is not None
            and newest.inputs is not None
            and newest.slots == rows
            and newest.pending == n
            and call.padded_length == newest.hidden.shape[1]
            and call.padded_rows == n
        ):  # the same rows as the last call (a cohort's next layer): its inputs hold
            self._residents.pop()
            for slot in rows:
                del held[slot]
            inputs = newest.inputs
            inputs.hidden = newest.hidden
            return inputs
        slots = rows + [self._pad_slot] * (call.padded_rows - n)
        tokens = sum(map(self._row_lengths.__getitem__, rows))
        residents, resident_of, row_of = {}, None, None
        if held:
            resident_of, row_of = [], []
            for slot in slots:
                resident, row = held.pop(slot, _IN_POOL)
                if resident is not None:
                    resident.pending -= 1
                    resident_of.append(residents.setdefault(resident, len(residents)))
                else:
                    resident_of.append(-1)
                row_of.append(row)
            if residents:
                self._drop_read_outputs()
            else:
                resident_of = row_of = None
        hidden, mask = self._tokens.gather(
            slots, call.padded_length, [resident.hidden for resident in residents], resident_of, row_of
        )
        if self._fixed_shapes:  # one graph per shape, the mask always given
            mask[:, 0] = True  # pad rows attend to their first (zero) token instead of nothing
        elif tokens == call.padded_rows * call.padded_length:
            mask = None  # no padding in the call: the layer runs without a mask, as Hugging Face does
        slot_index = torch.tensor(slots, device=self.device) if self._state else None  # only state reads it
        return _CallInputs(hidden, mask, slot_index, tokens)

    def _keep(self, hidden: torch.Tensor, slots: list[int], inputs: _CallInputs) -> None:
        """Keep a call's output where it is: the next calls read its rows from it. Past
        ``KEPT_OUTPUTS`` outputs, or more states than the pool holds, the oldest writes the rows
        it still holds to the pool."""
        inputs.hidden = None
        if self._residents:  # only the newest output's inputs are read again (a call of the same rows)
            self._residents[-1].inputs = None
        resident = _Resident(hidden, slots, inputs, len(slots))
        for row, slot in enumerate(slots):
            self._held[slot] = (resident, row)
        residents = self._residents
        residents.append(resident)
        while len(residents) > 1 and (len(residents) > KEPT_OUTPUTS or self._kept_states() > self._tokens.pool.numel()):
            oldest = residents.pop(0)
            write = [slot if self._held.get(slot, _IN_POOL)[0] is oldest else -1 for slot in oldest.slots]
            for slot in write:
                if slot >= 0:
                    del self._held[slot]
            self._tokens.scatter(write, oldest.hidden)

    def _drop_read_outputs(self) -> None:
        """Forget the kept outputs whose rows have all been read or have left."""
        self._residents = [resident for resident in self._residents if resident.pending]

    def _kept_states(self) -> int:
        """Elements of the kept outputs."""
        return sum(resident.hidden.numel() for resident in self._residents)

    def _release(self, slots: list[int]) -> None:
        """Sequences that left the encoder."""
        self._free(slots)
        self.scheduler.release_many(slots)

    def _free(self, slots: list[int]) -> None:
        if self._held:
            for slot in slots:
                resident, _ = self._held.pop(slot, _IN_POOL)  # gone: neither written back nor read
                if resident is not None:
                    resident.pending -= 1
            self._drop_read_outputs()
        self._tokens.release(slots)
        for slot in slots:
            self._keys[slot] = None
        self._free_slots += slots


@dataclass(slots=True)
class _CallInputs:
    """A layer call's inputs: ``hidden`` [padded_rows, padded_length, H]; ``mask`` [padded_rows,
    padded_length] or None (no padding) and ``layer_mask``, the layer's form of it (None until
    built); ``slot_index`` [padded_rows] on the device (None where nothing reads it: no state);
    ``tokens``: how many positions of the real rows are valid; ``positions``: the flat indices
    of the valid positions [T] on the device (built for packed calls)."""

    hidden: torch.Tensor | None
    mask: torch.Tensor | None
    slot_index: torch.Tensor | None
    tokens: int
    layer_mask: object = None
    positions: torch.Tensor | None = None


@dataclass(eq=False, slots=True)
class _Resident:
    """A call's output kept out of the pool: ``hidden`` [n, S, H] of ``slots``; ``inputs``: that
    call's inputs (no hidden), None once a later output is kept; ``pending``: how many of its rows
    no later call has read and are still in flight (the engine's ``_held`` maps each of them to
    its row here)."""

    hidden: torch.Tensor
    slots: list[int]
    inputs: _CallInputs | None
    pending: int


_IN_POOL = (None, -1)  # a slot's entry in ``_held`` when no kept output holds it


def _compiled_layer_call(adapter, options: dict):
    """A layer call through ``torch.compile``: one graph per call shape, shared by every layer.

    The layer's module is an argument of the compiled function, so the layers (same code,
    their own weights) share a graph. Shapes come from the scheduler's fixed sets, so the
    number of graphs is bounded: Dynamo's recompile limit is raised to hold them all, and
    ``dynamic=False`` keeps each graph static (what CUDA graphs, ``mode="reduce-overhead"``,
    need).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4096)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    compiled = torch.compile(_call_module, **{"dynamic": False, **options})
    return lambda index, hidden, mask: compiled(adapter.layer_module(index), hidden, mask)


def _call_module(module, hidden, mask):
    return module(hidden, mask)


def _on_pooled_rows(step, adapter):
    """A prepared ``step(pooled [n, H], state)`` as a step on the layer's output and mask."""

    def on_layer_output(hidden, mask, state):
        return step(adapter.pooled_hidden(hidden, mask), state)

    return on_layer_output


def _pooled_step(backend, policy, layer: int, num_layers: int, head):
    """The backend's fused pooled-head step of ``layer`` as a prepared step (see ``_prepared_head_steps``): its
    own prepared form where it has one (the weights and rule made ready once, not at every call)."""
    prepare = backend.prepare_pooled_head_exit_step
    prepared = prepare(policy, layer, num_layers, head) if prepare is not None else None
    if prepared is not None:
        return prepared

    def step(hidden, mask, state):
        exits, returned, _, state = backend.pooled_head_exit_step(policy, layer, num_layers, hidden, mask, head, state)
        return exits, returned, state

    return step
