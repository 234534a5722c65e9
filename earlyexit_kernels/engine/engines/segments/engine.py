"""E3's segments on one GPU: the layers split into segments, each refilling its calls to the token budget.

The cohort engine (:mod:`earlyexit_kernels.engine.engines.cohort_engine`) runs a cohort through every
layer; rows that exit leave its bucket, so its last layers run on a fraction of the rows it
started with. E3 (SOSP'24) keeps batches full after rows exit: the layers are split into
segments, and the rows that leave a segment alive wait in the next segment's queue, where the
survivors of several calls are combined into one full call. Here, on one device:

- the layers are split into ``segments`` segments of consecutive layers, as equal as they can be
  (:func:`~earlyexit_kernels.engine.engines.segments.step.segment_bounds`; default ``SEGMENTS`` = 3, equal
  thirds: 12 layers run as 1-4, 5-8, 9-12; a model of fewer layers one segment a layer);
- the first segment is fed from the pending texts as the cohort engine feeds its cohorts (the
  admission order, ``max_batch_size`` rows and ``max_tokens`` padded tokens,
  :func:`~earlyexit_kernels.engine.engines.launched.cohort_size`);
- every later segment has its own queue of rows that reached it, each with its hidden states and
  the policy's per-row state (on the device) and its length (on the host); a call takes rows from
  the front of the queue up to the same budget, so that a call holds the survivors of several
  calls of the segment below (``stats.refilled_calls`` counts the calls of a later segment that
  hold rows of more than one first-segment call);
- a call runs the graphed step's per-layer step over the segment's layers
  (:mod:`earlyexit_kernels.engine.engines.segments.step`): heads, the policy's decision and the write-back
  of the exiting rows' outputs on the device, the survivors gathered alive first, each step captured
  in a CUDA graph per (segment, bucket, length), no read-back inside the call;
- what the host needs of a call (its rows' logits, exit layers and layers run, and for a segment
  below the last the load positions and count of its survivors) is copied to pinned memory
  behind an event and read only after the next call has been launched (``COHORTS_IN_FLIGHT``
  calls in flight, as the cohorts): one read per call, never per layer. The read of a call's
  survivors is needed: the next segment's call cannot be sized to the budget, nor its rows
  known, without it; it is counted as ``stats.handoff_reads`` (``stats.host_syncs`` counts the
  blocking read-backs inside the layers, 0 here as in the cohort engine).

Which segment runs next: the deepest later segment whose queue holds a full call (rows beyond
``max_batch_size`` or ``max_tokens``), else the first segment on pending texts while fewer than
``max_in_flight`` sequences are admitted and unfinished, else the deepest queue that no call in
flight can still add rows to, partly full; else the oldest call in flight is read. The rows a
queue holds are thus bounded by ``max_in_flight`` (default: one full call per segment and one
more), and no row waits for a queue that cannot fill.

Each sequence's exit layer and layers run are the exact step's; its logits are the exact step's
up to the rounding of a batch of other rows (a GEMM's blocking on the CPU depends on the number
of rows; the test holds them within 1e-12 in float64 and bit for bit where a call's rows are one
exact-step batch's survivors, ``python_tests/test_segment_engine.py``). The engine is opt-in
(``engine="segments"``): ``"auto"`` keeps the cohort engine on CUDA until a GPU measures the
segments faster (``eek bench stream``'s (h) beside (f)).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from earlyexit_kernels.engine.engines import launched
from earlyexit_kernels.engine.engines.segments.step import Carried, Piece, segment_bounds, segment_steps
from earlyexit_kernels.engine.graphed.static_step import CUDA_LENGTH_STEP, static_batches_of
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy
from earlyexit_kernels.engine.stream.engine_config import EngineChoice, EngineConfig, engine_config
from earlyexit_kernels.engine.stream.stream_surface import EngineStats, Finished, LaunchedStream

__all__ = ["SegmentEngine", "SegmentStats", "SEGMENTS", "default_segments"]

# Segments where none is given: equal thirds of the layers (E3 splits a model into a few stages).
SEGMENTS = 3


def default_segments(num_layers: int) -> int:
    """The segments of a model of ``num_layers`` layers where none is given: ``SEGMENTS``, at most one a layer."""
    return min(SEGMENTS, num_layers)


@dataclass
class SegmentStats(EngineStats):
    """:class:`~earlyexit_kernels.engine.stream.stream_surface.EngineStats` and, per segment, its ``segment_calls``;
    ``refilled_calls``: calls of a later segment holding rows of more than one first-segment call;
    ``handoff_reads``: calls read back for their survivors (one per call below the last segment, a call late)."""

    segment_calls: list[int] = field(default_factory=list)
    refilled_calls: int = 0
    handoff_reads: int = 0


@dataclass(eq=False, slots=True)
class _Rows:
    """Rows waiting in a later segment's queue: ``carried`` rows ``start..start + len(keys)`` on the device,
    with their keys, lengths, first-segment calls (``origins``) and admission times, on the host."""

    carried: Carried
    start: int
    keys: list
    lengths: list[int]
    origins: list[int]
    admitted: list[float]


@dataclass(eq=False, slots=True)
class _Call:
    """A segment call launched and not read back: its rows (load order) on the host, its outputs (on the
    host once ``ready`` has passed), the rows it hands on (on the device)."""

    segment: int
    keys: list
    lengths: list[int]
    origins: list[int]
    admitted: list[float]
    launched_at: float
    outputs: list[torch.Tensor]  # logits, exit_layer, layers_run, and the survivors' positions and count
    carried: Carried | None
    ready: torch.cuda.Event | None
    buckets: list[int]
    length: int


class SegmentEngine(LaunchedStream):
    """Early exit over a stream of sequences with the layers in segments, each refilled to the token budget.

    The same interface as :class:`~earlyexit_kernels.engine.engines.cohort_engine.CohortEngine` (``submit``,
    ``step``, ``run``, ``cancel``, ``set_policy``, ``pending``, ``in_flight``, ``idle``, ``stats``), so that
    ``eek.classify`` and the server run it (``engine="segments"``). Its limits as the cohort engine's,
    one :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig` or its keywords: ``max_batch_size``
    (None: ``COHORT_ROWS``) and ``max_tokens`` (None: ``COHORT_TOKENS``) bound every segment's calls;
    ``max_in_flight``: most sequences admitted and not finished (None: one full call per segment and one
    more); ``segments``: how many segments (None: :func:`default_segments`). The model runs the graphed
    step's per-layer step whatever its ``step`` (on the CPU it gives the exact step's bits); a policy the
    graphed step cannot run (SkipGates) is refused.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, choice: EngineChoice | None = None, **limits):
        state, _ = self._open(model, engine_config(config, limits), "the segment engine", choice)
        config = self.config
        check_graphed_policy(self.policy)
        self.bounds = segment_bounds(
            self.num_layers, default_segments(self.num_layers) if config.segments is None else config.segments
        )
        # the patched model's static batches: where the graphed step keeps its buffers; the segments keep theirs beside
        self._steps = segment_steps(
            static_batches_of(state), self.adapter, self.heads, self.backend, self.device, self.dtype
        )
        on_gpu = self.device.type == "cuda"
        self.length_step = config.length_step or (CUDA_LENGTH_STEP if on_gpu else 1)
        self.max_batch_size, self.max_tokens = launched.cohort_limits(config)
        self.max_in_flight = config.max_in_flight or (len(self.bounds) + 1) * self.max_batch_size
        if self.max_in_flight < self.max_batch_size:
            raise ValueError(
                f"max_in_flight must be an integer >= max_batch_size={self.max_batch_size}, got {self.max_in_flight!r}"
            )
        self._queues: list[deque[_Rows]] = [deque() for _ in self.bounds]  # [0] unused: the pending texts feed it
        self._unread: deque[_Call] = deque()
        self._first_calls = 0
        self.stats = SegmentStats(segment_calls=[0] * len(self.bounds))

    # ------------------------------------------------------------------ submission

    def cancel(self, keys) -> int:
        """Drop the sequences with these keys, pending, queued at a segment or in a call in flight (their
        outputs are not returned). Returns how many were found."""
        keys = set(keys)
        found = self._pending.remove(keys)
        for queue in self._queues:
            kept = []
            for rows in queue:
                dropped = sum(key in keys for key in rows.keys)
                found += dropped
                self._rows_in_flight -= dropped
                kept += _without(rows, keys) if dropped else [rows]
            queue.clear()
            queue.extend(kept)
        launched = {key for call in self._unread for key in call.keys} & keys
        self._cancelled |= launched
        return found + len(launched)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._unread and not any(self._queues)

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Launch the next call (:meth:`_choose`), then read the oldest call back where ``COHORTS_IN_FLIGHT``
        are in flight, or where nothing could be launched. Returns the sequences that exited in it."""
        segment = self._choose()
        if segment is not None:
            self._launch(segment)
            if len(self._unread) < launched.COHORTS_IN_FLIGHT:
                return []
        if self._unread:
            return self._read_back(self._unread.popleft())
        if not self.idle:  # every admitted row is in a queue or a call: one of them can always run
            raise RuntimeError(f"the segment engine has {self._rows_in_flight} rows in flight and none to run")
        return []

    # ------------------------------------------------------------------ choosing a call

    def _fits(self, lengths: list[int]) -> int:
        return launched.cohort_size(lengths, self.max_batch_size, self.max_tokens, self.length_step)

    def _queued_lengths(self, segment: int, most: int) -> list[int]:
        lengths: list[int] = []
        for rows in self._queues[segment]:
            lengths += rows.lengths[: most - len(lengths)]
            if len(lengths) >= most:
                break
        return lengths

    def _full(self, segment: int) -> bool:
        """Whether ``segment``'s queue holds a full call: ``max_batch_size`` rows, or more than the token budget takes."""
        lengths = self._queued_lengths(segment, self.max_batch_size + 1)
        if not lengths:
            return False
        taken = self._fits(lengths)
        return taken < len(lengths) or taken >= self.max_batch_size

    def _choose(self) -> int | None:
        """The segment to run next, or None (read a call back first)."""
        later = range(len(self.bounds) - 1, 0, -1)
        for segment in later:
            if self._full(segment):
                return segment
        if self._pending and self._rows_in_flight < self.max_in_flight:
            return 0
        # A partly full queue runs once no call in flight can add to it: calls of a segment below it.
        lowest_unread = min((call.segment for call in self._unread), default=len(self.bounds))
        for segment in later:
            if self._queues[segment] and lowest_unread >= segment:
                return segment
        return None

    # ------------------------------------------------------------------ launching

    def _launch(self, segment: int) -> None:
        if segment == 0:
            call = self._launch_first()
        else:
            call = self._launch_later(segment)
        self.stats.segment_calls[segment] += 1
        self._unread.append(call)

    def _launch_first(self) -> _Call:
        room = self.max_in_flight - self._rows_in_flight
        entries, launched_at = self._admit(min(room, self.max_batch_size), self._fits)
        lengths, hidden, mask, summary = launched.cohort_inputs(self, entries)
        result = self._steps.run_first(self.policy, self.bounds[0], hidden, mask, summary)
        rows = len(entries)
        self.stats.admitted += rows
        self._rows_in_flight += rows
        origin, self._first_calls = self._first_calls, self._first_calls + 1
        return self._call(
            0,
            result,
            [entry[2] for entry in entries],
            lengths.tolist(),
            [origin] * rows,
            [launched_at] * rows,
            launched_at,
        )

    def _launch_later(self, segment: int) -> _Call:
        queue = self._queues[segment]
        count = self._fits(self._queued_lengths(segment, self.max_batch_size))
        pieces, keys, lengths, origins, admitted = [], [], [], [], []
        while count:
            rows = queue[0]
            take = min(count, len(rows.keys))
            pieces.append(Piece(rows.carried, rows.start, take))
            keys += rows.keys[:take]
            lengths += rows.lengths[:take]
            origins += rows.origins[:take]
            admitted += rows.admitted[:take]
            if take == len(rows.keys):
                queue.popleft()
            else:
                queue[0] = _Rows(
                    rows.carried,
                    rows.start + take,
                    rows.keys[take:],
                    rows.lengths[take:],
                    rows.origins[take:],
                    rows.admitted[take:],
                )
            count -= take
        launched_at = time.perf_counter()
        extents = self.to_device(np.asarray(lengths, dtype=np.int64))
        result = self._steps.run_carried(self.policy, self.bounds[segment], pieces, extents, lengths)
        if len(set(origins)) > 1:
            self.stats.refilled_calls += 1
        return self._call(segment, result, keys, lengths, origins, admitted, launched_at)

    def _call(self, segment, result, keys, lengths, origins, admitted, launched_at) -> _Call:
        outputs = [result.logits, result.exit_layer, result.layers_run]
        ready = None
        if self.device.type != "cpu":  # copies queued behind the call, an event after them: read a call late
            outputs = launched.copy_to_host(tuple(outputs), pin=True)
            if result.survivors is not None:
                outputs += launched.copy_to_host((result.survivors,), pin=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the model's device's
        elif result.survivors is not None:
            outputs.append(result.survivors)
        return _Call(
            segment,
            keys,
            lengths,
            origins,
            admitted,
            launched_at,
            outputs,
            result.carried,
            ready,
            result.buckets,
            result.length,
        )

    # ------------------------------------------------------------------ reading back

    def _read_back(self, call: _Call) -> list[Finished]:
        if call.ready is not None:
            call.ready.synchronize()  # launched before the call the device runs now
        now = time.perf_counter()
        logits, exit_layers, layers_run = call.outputs[0], call.outputs[1].tolist(), call.outputs[2].tolist()
        self._record_layer_calls(call, exit_layers)
        finished = []
        for row, key in enumerate(call.keys):
            if not exit_layers[row]:
                continue  # handed on
            self._rows_in_flight -= 1
            if key in self._cancelled:
                self._cancelled.discard(key)
                continue
            self.stats.inference_seconds.observe(now - call.admitted[row])
            finished.append(
                Finished(
                    key, logits[row], exit_layers[row], layers_run[row], call.admitted[row], now - call.admitted[row]
                )
            )
        if len(call.outputs) > 3:
            self.stats.handoff_reads += 1
            self._hand_on(call, call.outputs[3].tolist())
        return finished

    def _hand_on(self, call: _Call, survivors: list[int]) -> None:
        """Queue the rows ``call`` handed on at the next segment: ``survivors`` their load positions, alive
        first (row ``i`` of ``call.carried`` is the row loaded at ``survivors[i]``), then their count;
        cancelled ones dropped."""
        positions = survivors[: survivors[-1]]
        if not positions:
            return
        rows = _Rows(
            call.carried,
            0,
            [call.keys[p] for p in positions],
            [call.lengths[p] for p in positions],
            [call.origins[p] for p in positions],
            [call.admitted[p] for p in positions],
        )
        dropped = {key for key in rows.keys if key in self._cancelled}
        self._cancelled -= dropped
        self._rows_in_flight -= len(dropped)
        self._queues[call.segment + 1].extend(_without(rows, dropped) if dropped else [rows])

    def _record_layer_calls(self, call: _Call, exit_layers: list[int]) -> None:
        """The call's layer calls in the engine's counts: per layer run, the rows still in it (a row handed
        on is in every layer of the segment), its bucket and the tokens of those rows."""
        stats = self.stats
        first = self.bounds[call.segment][0]
        exits = np.asarray([e if e else self.num_layers + 1 for e in exit_layers])
        lengths = np.asarray(call.lengths)
        for layer, bucket in enumerate(call.buckets, first):
            alive = exits >= layer
            stats.calls += 1
            stats.rows += int(alive.sum())
            stats.padded_rows += bucket
            stats.slots += bucket * call.length
            stats.tokens += int(lengths[alive].sum())
            stats.largest_call = max(stats.largest_call, bucket * call.length)


def _without(rows: _Rows, keys: set) -> list[_Rows]:
    """``rows`` without the rows of ``keys``: the runs of consecutive rows kept, each its own entry."""
    runs: list[_Rows] = []
    begin = None
    for index in range(len(rows.keys) + 1):
        kept = index < len(rows.keys) and rows.keys[index] not in keys
        if kept and begin is None:
            begin = index
        elif not kept and begin is not None:
            runs.append(
                _Rows(
                    rows.carried,
                    rows.start + begin,
                    rows.keys[begin:index],
                    rows.lengths[begin:index],
                    rows.origins[begin:index],
                    rows.admitted[begin:index],
                )
            )
            begin = None
    return runs
