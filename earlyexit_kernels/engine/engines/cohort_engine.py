"""The GPU's stream engine: length-sorted cohorts through the graphed step, their exits read a cohort late.

On a GPU a layer call of the continuous engine (:mod:`earlyexit_kernels.engine.engines.continuous.engine`) costs
launches and syncs, not rows: token indices built on the host, the state gathered and written
back, the hidden states copied in and out of the pool, and a blocking read-back, for some 70 us
of GPU work. Per-batch early exit on length-sorted batches, the patched model's graphed step
(:mod:`earlyexit_kernels.engine.graphed.static_step`), ran at 1.02 of the token-layer ideal on an H100
where that engine ran at 0.27 (issue 96). This engine is that path, fed by a stream:

- a **cohort** is the next pending sequences in the admission order (``"length"``: a sweep over
  lengths, so a cohort's rows have similar lengths; ``"fifo"``: arrival order), as many as fit
  ``max_batch_size`` rows and ``max_tokens`` padded tokens (rows x the longest length, rounded up
  to the graphed step's length step): calls sized by a token budget, as text-embeddings-inference's
  ``--max-batch-tokens`` (16,384 by default, as there);
- its token ids, types and mask are built on the host and copied from pinned memory without a
  wait; the mask's summary (each row's extent, the longest, the padded count) and the ids' range
  are known on the host, so the forward reads nothing back before its first layer;
- the embeddings and the graphed step run the cohort: every layer in a fixed bucket of rows,
  exited rows dropped to the tail, the buckets shrinking as survivor counts arrive a layer late,
  each (layer, bucket, length) step captured once in a CUDA graph;
- its outputs (logits, exit layer, layers run) are copied to pinned memory behind an event, and
  read only after the next cohort has been launched: at most ``COHORTS_IN_FLIGHT`` cohorts are in
  flight, so the GPU runs one while the host reads the other's exits and builds the next.

The exit decisions and the compaction stay on the device; the host waits only for a cohort
launched before the one the GPU is running. On the CPU (``engine="cohorts"``) the same engine runs
the step uncaptured: the CPU twin the tests read, whose outputs equal the patched model's on the
same cohort bit for bit. ``engine="auto"`` (:mod:`earlyexit_kernels.engine.engines.choice`) takes it
on CUDA where the model runs the graphed step, and the continuous engine elsewhere.

E3's segments (layers split into stages that each refill their batch from the rows leaving the
stage below) are the segment engine's (:mod:`earlyexit_kernels.engine.engines.segments.engine`,
``engine="segments"``, opt-in): here exited rows leave a cohort's bucket instead; a GPU has to
measure whether refilling pays beyond that.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from earlyexit_kernels.engine.engines.launched import (
    COHORTS_IN_FLIGHT,
    cohort_inputs,
    cohort_limits,
    cohort_size,
    copy_to_host,
)
from earlyexit_kernels.engine.graphed.static_step import CUDA_LENGTH_STEP, run_graphed, static_batches_of
from earlyexit_kernels.engine.step.batch_loop import run_early_exit
from earlyexit_kernels.engine.step.ov_exit_graph import exit_graph, run_exit_graph
from earlyexit_kernels.engine.stream.engine_config import EngineChoice, EngineConfig, engine_config
from earlyexit_kernels.engine.stream.stream_surface import EngineStats, Finished, LaunchedStream

__all__ = ["CohortEngine"]


@dataclass(eq=False, slots=True)
class _Cohort:
    """A cohort launched and not read back: its sequences' ``keys`` and ``lengths`` (host), its
    outputs (on the host once ``ready`` has passed), when it was launched."""

    keys: list
    lengths: np.ndarray
    logits: torch.Tensor
    exit_layer: torch.Tensor
    layers_run: torch.Tensor
    ready: torch.cuda.Event | None
    launched_at: float
    padded_length: int
    buckets: list[int]
    token_buckets: list[int]  # the packed-token step's token bucket per layer call; empty where padded


class CohortEngine(LaunchedStream):
    """Early exit over a stream of sequences in length-sorted cohorts, on the patched model's step.

    The same interface as :class:`~earlyexit_kernels.engine.engines.continuous.engine.ContinuousEngine`
    (``submit``, ``step``, ``run``, ``cancel``, ``set_policy``, ``pending``, ``in_flight``,
    ``idle``, ``stats``), so that ``eek.classify`` and the server run either. The limits come as
    one :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig` or keywords of its names:
    ``max_batch_size``: most rows of a cohort (None: ``COHORT_ROWS``); ``max_tokens``: most rows x
    padded length (None: ``COHORT_TOKENS``); ``max_length``; ``length_step`` (None: the graphed
    step's on CUDA, 32, else 1); ``admission``; ``max_in_flight``: most sequences in launched
    cohorts (None: two full cohorts). ``compile`` and ``packed`` belong to the continuous engine
    and are refused; ``max_wait``, ``call_cost`` and ``max_age`` are its scheduler's and not read.

    ``step`` launches the next cohort where fewer than ``COHORTS_IN_FLIGHT`` are in flight, then,
    where that many are (or nothing is left to launch), reads the oldest back and returns its
    sequences as :class:`~earlyexit_kernels.engine.stream.stream_surface.Finished`.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, choice: EngineChoice | None = None, **limits):
        state, step = self._open(model, engine_config(config, limits), "the cohort engine", choice)
        config = self.config
        self.graphed = step == "graphed"
        if self.graphed:
            static_batches_of(state)
        self._state = state
        on_gpu = self.device.type == "cuda"
        self.length_step = config.length_step or (CUDA_LENGTH_STEP if on_gpu and self.graphed else 1)
        self.max_batch_size, self.max_tokens = cohort_limits(config)
        self.max_in_flight = config.max_in_flight or COHORTS_IN_FLIGHT * self.max_batch_size
        if self.max_in_flight < self.max_batch_size:
            raise ValueError(
                f"max_in_flight must be an integer >= max_batch_size={self.max_batch_size}, got {self.max_in_flight!r}"
            )
        self._cohorts: deque[_Cohort] = deque()
        self.stats = EngineStats()
        if self.device.type == "cpu" and state.step == "auto":
            self._prepare_exit_graph()

    def _prepare_exit_graph(self) -> None:
        """Build and compile the model's exit graph now, where :meth:`_run` will run it (static int8 layers on
        OpenVINO), not in the first cohort large enough to take it: its conversion and compilation take seconds, which
        a server would otherwise spend inside a request (MiniLM-L6 on the Intel Xeon with AMX, served at c32: a p99
        of 6.8 s, ``benchmarks/results/intel_xeon/serve_cohorts_2026-12-02/serve_peers_xeon_cohorts_round1.json``).
        Nothing where it cannot run."""
        graph = exit_graph(self.model, self.adapter, self.heads, self.policy)
        if graph is not None:
            graph.compiled()

    # ------------------------------------------------------------------ submission

    def cancel(self, keys) -> int:
        """Drop the sequences with these keys, pending or in a launched cohort (their outputs are not
        returned). Returns how many were found."""
        keys = set(keys)
        dropped = self._pending.remove(keys)
        launched = {key for cohort in self._cohorts for key in cohort.keys} & keys
        self._cancelled |= launched
        return dropped + len(launched)

    @property
    def idle(self) -> bool:
        return not self._pending and not self._cohorts

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Launch the next cohort where there is room; read the oldest back where the cohorts in flight are
        ``COHORTS_IN_FLIGHT`` or nothing is left to launch. Returns the sequences read back."""
        if self._pending and len(self._cohorts) < COHORTS_IN_FLIGHT:
            room = self.max_in_flight - self._rows_in_flight
            if room > 0:
                self._launch(room)
        if self._cohorts and (len(self._cohorts) >= COHORTS_IN_FLIGHT or not self._pending):
            return self._read_back(self._cohorts.popleft())
        return []

    # ------------------------------------------------------------------ internals

    def _fits(self, lengths: list[int]) -> int:
        """How many of the next pending ``lengths`` one cohort takes (:func:`cohort_size`)."""
        return cohort_size(lengths, self.max_batch_size, self.max_tokens, self.length_step)

    def _run(self, lengths: np.ndarray, hidden, mask_d, summary):
        """The cohort through the patched model's step: the graphed step's, else (on the CPU, static int8 layers on
        OpenVINO) the exit graph's, else the exact step's."""
        if self.graphed:
            return run_graphed(
                self.adapter,
                self.heads,
                self.policy,
                self.backend,
                hidden,
                mask_d,
                batches=self._state.static_batches,
                mask_summary=summary,
                align_unpadded=True,
            )
        if self.device.type == "cpu" and self._state.step == "auto":
            # static int8 layers on OpenVINO: the cohort's layers, heads and rule in one call (None: the exact step)
            result = run_exit_graph(self.model, self.adapter, self.heads, self.policy, hidden, mask_d)
            if result is not None:
                return result
        return run_early_exit(self.adapter, self.heads, self.policy, self.backend, hidden, mask_d, mask_summary=summary)

    def _launch(self, room: int) -> None:
        entries, launched_at = self._admit(min(room, self.max_batch_size), self._fits)
        lengths, hidden, mask_d, summary = cohort_inputs(self, entries)
        rows = len(entries)
        result = self._run(lengths, hidden, mask_d, summary)
        self.stats.host_syncs += result.host_syncs
        self.stats.admitted += rows
        logits, exit_layer, layers_run, ready = self._outputs_to_host(result)
        buckets = list(getattr(result, "buckets", None) or [])
        self._cohorts.append(
            _Cohort(
                [entry[2] for entry in entries],
                lengths,
                logits,
                exit_layer,
                layers_run,
                ready,
                launched_at,
                summary[1],
                buckets,
                list(getattr(result, "token_buckets", None) or []),
            )
        )
        self._rows_in_flight += rows

    def _outputs_to_host(self, result) -> tuple:
        """The cohort's outputs on the host: copies queued behind the step and an event after them on a
        GPU (read at :meth:`_read_back`), the tensors themselves on the CPU."""
        outputs = (result.logits, result.exit_layer, result.layers_run)
        if self.device.type == "cpu":
            return (*outputs, None)
        copies = copy_to_host(outputs, pin=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the model's device's
        return (*copies, ready)

    def _read_back(self, cohort: _Cohort) -> list[Finished]:
        if cohort.ready is not None:
            cohort.ready.synchronize()  # a cohort launched before the one the GPU runs now
        now = time.perf_counter()
        self._rows_in_flight -= len(cohort.keys)
        exit_layers = cohort.exit_layer.tolist()
        layers_run = cohort.layers_run.tolist()
        self._record_layer_calls(cohort, np.asarray(exit_layers))
        finished = []
        seconds = now - cohort.launched_at
        for row, key in enumerate(cohort.keys):
            if key in self._cancelled:
                self._cancelled.discard(key)
                continue
            self.stats.inference_seconds.observe(seconds)
            finished.append(
                Finished(key, cohort.logits[row], exit_layers[row], layers_run[row], cohort.launched_at, seconds)
            )
        return finished

    def _record_layer_calls(self, cohort: _Cohort, exit_layers: np.ndarray) -> None:
        """The cohort's layer calls in the engine's counts: per layer run, the rows still in it, its bucket
        (padded rows) and the tokens of those rows; known once its exits are on the host."""
        stats = self.stats
        buckets = cohort.buckets or [len(cohort.keys)] * int(exit_layers.max(initial=0))
        for layer, bucket in enumerate(buckets, 1):
            alive = exit_layers >= layer
            rows = int(alive.sum())
            # the positions the call ran: its rows padded to the cohort's longest, or its packed token bucket
            slots = cohort.token_buckets[layer - 1] if cohort.token_buckets else bucket * cohort.padded_length
            stats.calls += 1
            stats.rows += rows
            stats.padded_rows += bucket
            stats.slots += slots
            stats.tokens += int(cohort.lengths[alive].sum())
            stats.largest_call = max(stats.largest_call, slots)
