"""What every stream engine shows its callers alike, one module: a sequence checked when it is submitted, the
admission order and the counts, the policy moved in place, and :meth:`run`.

The continuous engine (:mod:`.continuous`, the CPU's), the cohort engine (:mod:`.cohort_engine`) and the segment
engine (:mod:`.segment_engine`) differ in how they run their calls; :class:`StreamSurface` is the part a caller
(``eek.classify``, the engine thread, the server) sees the same on each, and :class:`LaunchedStream` adds what the
engines whose calls are launched and read back a call late share (no age rule, a policy swap that keeps the
buffers: on a GPU each static batch captures its steps again under the new thresholds at its next use,
``StaticBatch.forget_other_policy``). The checks a submission and a policy swap make, and the stream's ``max_length``, are the
functions below, so that every engine refuses bad input in the same words before anything runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.engine.layers.module_weights import linear_compute_dtype
from earlyexit_kernels.engine.step.inputs import check_ids
from earlyexit_kernels.engine.step.patched_state import patched_state
from earlyexit_kernels.engine.step.start_state import start_state
from earlyexit_kernels.engine.step.step_choice import resolve_step
from earlyexit_kernels.engine.stream.admission import PendingQueue
from earlyexit_kernels.engine.stream.timings import SecondsHistogram
from earlyexit_kernels.methods.policies import Scheduled

__all__ = [
    "EngineStats",
    "Finished",
    "LaunchedStream",
    "StreamSurface",
    "checked_policy_swap",
    "checked_tokens",
    "model_max_length",
    "stream_max_length",
    "stream_policy",
]


@dataclass(slots=True)
class Finished:
    """A sequence that left the encoder: ``key`` as submitted, ``logits`` [C] on the CPU (model dtype);
    ``admitted_at``: when it was admitted (embedded into layer 1), ``time.perf_counter()``;
    ``in_calls``: the seconds since then spent in the layer calls that held it (the rest of its
    inference time it waited for a call: others' rows, admissions, the engine thread's turns)."""

    key: object
    logits: torch.Tensor
    exit_layer: int
    layers_run: int
    admitted_at: float = 0.0
    in_calls: float = 0.0


@dataclass
class EngineStats:
    """What the engine did: layer calls, rows and tokens they held, host read-backs; per sequence,
    its time waiting for admission and its time in the encoder (:mod:`.timings`)."""

    admitted: int = 0
    calls: int = 0
    rows: int = 0
    padded_rows: int = 0
    slots: int = 0  # padded_rows x padded_length, summed over calls
    tokens: int = 0  # real tokens, summed over calls
    host_syncs: int = 0
    packed_calls: int = 0  # layer calls run on their real tokens only
    largest_call: int = 0  # the most slots (padded_rows x padded_length) of one call
    queue_seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # per sequence: submission to admission
    inference_seconds: SecondsHistogram = field(default_factory=SecondsHistogram)  # admission to exit

    def record_call(self, call, tokens: int) -> None:
        self.calls += 1
        self.largest_call = max(self.largest_call, call.padded_rows * call.padded_length)
        self.rows += len(call.rows)
        self.padded_rows += call.padded_rows
        self.slots += call.padded_rows * call.padded_length
        self.tokens += tokens


class StreamSurface:
    """The members every stream engine has alike. An engine sets ``model``, ``adapter``, ``policy``,
    ``max_length``, ``_pending`` (its :class:`~earlyexit_kernels.engine.stream.admission.PendingQueue`) and ``idle``,
    and says in :attr:`calls_made` how many calls it has made (where a submitted sequence's age starts)."""

    @property
    def calls_made(self) -> int:
        raise NotImplementedError

    def _open(self, model, config, name: str, choice) -> tuple:
        """What every stream engine takes alike from the patched ``model``, its ``config`` and the engine ``choice``
        (None: read and resolved here; ``name``: the engine, in the error for a model nobody patched): the policy,
        adapter, heads, sizes, device, compute dtype, backend, ``max_length`` and the pending queue. Returns the
        model's patched record and its step (``"exact"`` or ``"graphed"``)."""
        self.config = config
        state = patched_state(model, name) if choice is None else choice.state
        self.policy = stream_policy(model, state)
        self.model, self.adapter, self.heads = model, state.adapter, model.early_exit_heads
        self.num_layers, self.num_labels = self.adapter.num_layers, self.adapter.num_labels
        self.device = next(model.parameters()).device
        self.dtype = linear_compute_dtype(self.adapter.final_classifier)
        self.backend = resolve_backend(
            state.backend,
            self.device,
            dtype=self.dtype,
            hidden_size=self.adapter.hidden_size,
            num_labels=self.num_labels,
        )
        self.max_length = stream_max_length(model, config.max_length)
        self.pad_token_id = getattr(model.config, "pad_token_id", None) or 0
        self._pending = PendingQueue(config.admission)
        step = resolve_step(state.step, self.policy, self.device) if choice is None else choice.step
        return state, step

    def submit(self, key, input_ids, token_type_ids=None, submitted_at: float | None = None) -> None:
        """Queue one sequence (token ids, special tokens included, at most ``max_length``).

        ``submitted_at``: when it was submitted (``time.perf_counter()``; default now), where its
        queue time starts (``stats.queue_seconds``)."""
        input_ids, token_type_ids = checked_tokens(self, key, input_ids, token_type_ids)
        # Checked here, on the host: an id out of range would otherwise fail in a kernel.
        check_ids(input_ids, self.adapter.vocab_size)
        at = time.perf_counter() if submitted_at is None else submitted_at
        self._pending.add(key, input_ids, token_type_ids, self.calls_made, at)

    @property
    def admission(self) -> str:
        """The admission order, ``"fifo"`` or ``"length"`` (see :mod:`earlyexit_kernels.engine.stream.admission`)."""
        return self._pending.order

    @property
    def pending(self) -> int:
        """Sequences submitted and not admitted yet."""
        return len(self._pending)

    def check_policy(self, policy) -> None:
        """A ``ValueError`` unless :meth:`set_policy` can take ``policy``; reads the engine, changes nothing."""
        checked_policy_swap(self, policy)

    def run(self):
        """Step until every submitted sequence has exited, yielding them as they do."""
        while not self.idle:
            yield from self.step()


class LaunchedStream(StreamSurface):
    """A stream engine whose calls are launched and read back a call late (cohorts, segments)."""

    def _open(self, model, config, name: str, choice) -> tuple:
        """:meth:`StreamSurface._open`, after the refusals of ``compile`` and ``packed`` (the continuous engine's),
        with what the launched engines add: cancelled keys, rows in flight, pinned host buffers on a GPU."""
        if config.compile:
            raise ValueError(f"compile is the continuous engine's (engine='continuous'); {name} runs the graphed step")
        if config.packed:
            raise ValueError("packed is the continuous engine's (engine='continuous'); leave it at None")
        opened = super()._open(model, config, name, choice)
        self._cancelled: set = set()
        self._rows_in_flight = 0
        self._pinned = self.device.type == "cuda"  # host buffers pinned, copies without a wait
        return opened

    def _admit(self, most: int, fits) -> tuple[list, float]:
        """The next pending entries (at most ``most``, as many as ``fits`` takes) and when they are launched, their
        time in the queue observed."""
        entries = self._pending.take(most, fits=fits)
        launched_at = time.perf_counter()
        for entry in entries:
            self.stats.queue_seconds.observe(launched_at - entry[6])
        return entries, launched_at

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the engine's device: on a GPU through pinned memory without a wait (the caching host
        allocator keeps the pinned block until the copy has run)."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        if self._pinned:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=self._pinned)

    @property
    def calls_made(self) -> int:
        return self.stats.calls

    @property
    def in_flight(self) -> int:
        """Sequences admitted and not read back yet (in a call, or queued between calls)."""
        return self._rows_in_flight

    @property
    def max_age(self) -> None:
        """No age rule (None): the calls take the pending texts in the admission order, a server's the arrival
        order, so the oldest pending sequence is always in the next call."""
        return None

    def set_policy(self, policy) -> None:
        """Decide exits with ``policy`` from the next call on (the same family and per-sequence state)."""
        checked_policy_swap(self, policy)
        self.policy = policy


def _token_array(key, name: str, values) -> np.ndarray:
    """``values`` (a list, tuple, array or 1-D tensor of integers) as a 1-D int64 array."""
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if array.size == 0:
        return array.astype(np.int64).reshape(-1)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TypeError(
            f"sequence {key!r}: {name} must be a flat sequence of integers (token ids), "
            f"got {array.dtype} of shape {array.shape}"
        )
    return array.astype(np.int64, copy=False)


def checked_tokens(engine, key, input_ids, token_type_ids) -> tuple[np.ndarray, np.ndarray | None]:
    """A submitted sequence's ``(input_ids, token_type_ids)`` as int64 arrays, checked against ``engine``'s
    ``max_length`` and whether its model takes token types (a ``ValueError`` or ``TypeError`` naming the
    sequence otherwise)."""
    input_ids = _token_array(key, "input_ids", input_ids)
    if not 1 <= len(input_ids) <= engine.max_length:
        raise ValueError(
            f"sequence {key!r} has {len(input_ids)} tokens; it must have 1..{engine.max_length} (max_length)"
        )
    if token_type_ids is not None and not getattr(engine.adapter, "uses_token_type_ids", True):
        raise TypeError(f"sequence {key!r}: {type(engine.model).__name__} takes no token_type_ids; leave them out")
    if token_type_ids is not None:
        token_type_ids = _token_array(key, "token_type_ids", token_type_ids)
        if len(token_type_ids) != len(input_ids):
            raise ValueError(
                f"sequence {key!r}: token_type_ids has {len(token_type_ids)} entries for {len(input_ids)} tokens"
            )
    return input_ids, token_type_ids


def _state_shapes(engine, policy) -> dict:
    with torch.no_grad():
        template = start_state(policy, engine.adapter, 1, engine.device, engine.dtype)
    return {key: tuple(value.shape) for key, value in template.items()}


def stream_policy(model, state):
    """The patched ``model``'s policy, for a stream engine: refused in training mode, and where it is
    ``Scheduled`` (exit layers per batch position mean nothing over a stream)."""
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before classifying")
    if isinstance(state.policy, Scheduled):
        raise ValueError(
            "Scheduled replays exit layers given per batch position and has no meaning over a stream; "
            "use a threshold policy (e.g. eek.Entropy(0.3)) or call the model on batches"
        )
    return state.policy


def checked_policy_swap(engine, policy) -> None:
    """A ``ValueError`` unless ``engine`` can serve ``policy`` in place of its own: the same family,
    fitting the model, keeping the same per-sequence state."""
    if type(policy) is not type(engine.policy):
        raise ValueError(
            f"set_policy moves a {type(engine.policy).__name__} policy's thresholds; got a {type(policy).__name__}"
        )
    policy.check_fits(engine.num_layers, engine.num_labels)
    if _state_shapes(engine, policy) != _state_shapes(engine, engine.policy):
        raise ValueError(f"set_policy: {policy!r} keeps another per-sequence state than {engine.policy!r}")


def stream_max_length(model, max_length: int | None) -> int:
    """A stream engine's ``max_length``: the model's positions where None, refused past them (its type and
    sign are EngineConfig's)."""
    limit = model_max_length(model)
    if max_length is None:
        return limit
    if max_length > limit:
        raise ValueError(f"max_length must be an integer in 1..{limit} (the model's positions), got {max_length!r}")
    return max_length


def model_max_length(model) -> int:
    """The longest sequence the model's position embeddings hold."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    if type(model).__name__.startswith(("Roberta", "XLMRoberta", "Camembert")):
        limit -= (config.pad_token_id or 0) + 1  # positions start after the padding index
    return int(limit)
