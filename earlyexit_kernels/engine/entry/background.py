"""The continuous engine on a thread of its own, fed by a queue: what a server puts behind its event loop.

    worker = BackgroundEngine(model, max_batch_size=64, max_queue=1024)
    future = worker.submit(input_ids, token_type_ids)    # concurrent.futures.Future[Finished]
    futures = worker.submit_many([(ids, types), ...])    # one request's sequences, admitted together
    finished = future.result()                           # or asyncio.wrap_future(future)
    worker.cancel(future)                                # the client went away
    worker.close(drain=True)                             # finish what was submitted, then stop

Only the engine thread touches the engine: ``submit`` and ``cancel`` post commands that
the thread applies between two steps, so a caller never waits for a layer call.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch

from earlyexit_kernels.engine.engines.choice import make_engine
from earlyexit_kernels.engine.stream.engine_config import EngineConfig, engine_config
from earlyexit_kernels.engine.stream.stream_surface import Finished

__all__ = ["BackgroundEngine", "QueueFull"]


class QueueFull(RuntimeError):
    """``max_queue`` sequences are already waiting or in flight: try again later."""


# the commands a caller posts to the engine thread's inbox


@dataclass(frozen=True)
class Submit:
    """One request's sequences, one future each, admitted together; their queue time runs from ``submitted_at``."""

    futures: list[Future]
    sequences: list[tuple[list[int], object]]
    submitted_at: float


@dataclass(frozen=True)
class Cancel:
    """Drop the sequence of ``future`` (its caller cancelled it)."""

    future: Future


@dataclass(frozen=True)
class SetPolicy:
    """Serve ``policy`` from the next layer call."""

    policy: object


@dataclass(frozen=True)
class Stop:
    """Take no more; ``drain``: finish what was submitted first, else cancel it."""

    drain: bool


class BackgroundEngine:
    """Run a :class:`ContinuousEngine` on a daemon thread, under ``config`` (an
    :class:`~earlyexit_kernels.engine.stream.engine_config.EngineConfig`) or keyword ``limits`` of the same names.

    ``max_queue``: most sequences submitted and not finished; ``submit`` beyond it raises
    :class:`QueueFull` at once instead of growing memory. A sequence's future resolves to
    its :class:`earlyexit_kernels.engine.stream.stream_surface.Finished` as soon as it exits. The engine's
    bounded waiting (``max_age``, on by default) holds from when the thread takes a sequence;
    its queue time (``engine.stats.queue_seconds``) runs from its ``submit``.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, max_queue: int = 4096, **limits):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self._model, self._config = model, engine_config(config, limits)
        self.engine = make_engine(model, self._config)
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict[int, Future] = {}  # touched by the engine thread only
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._closing = False
        self._stopped_by: BaseException | None = None  # what ended the thread, where it did not stop as asked
        self._stopping: bool | None = None  # None, or whether to drain before stopping
        self._policy = None  # the policy set since the start (set_policy), else the model's
        self._thread = threading.Thread(target=self._loop, name="eek-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (False once closed, or stopped by an error it could not recover from)."""
        return self._thread.is_alive()

    @property
    def stopped_by(self) -> BaseException | None:
        """The error the engine thread ended on, where it could not recover (None while it runs, or after close)."""
        return self._stopped_by

    @property
    def outstanding(self) -> int:
        """Sequences submitted and not finished (queued, embedded or in flight)."""
        return self._outstanding

    def submit(self, input_ids, token_type_ids=None) -> Future:
        """Queue one tokenized sequence; returns a future of its :class:`Finished`.

        The future's ``eek_taken`` is set to ``time.perf_counter()`` when the engine thread
        takes the sequence (between two steps), for a server's queue-time header.
        """
        return self.submit_many([(input_ids, token_type_ids)])[0]

    def submit_many(self, sequences) -> list[Future]:
        """Queue ``(input_ids, token_type_ids or None)`` per sequence; one future each, in order.

        The engine thread takes them all between the same two steps, so a request's sequences
        are batched together rather than in whatever pieces the thread caught while they were
        being queued one by one (the batches of a lone request, and so its float results on
        CPUs whose matrix products depend on the batch's shape, do not depend on timing). All
        or nothing: a bad length raises ``ValueError`` and a full queue :class:`QueueFull`
        before any is queued.
        """
        sequences = [(list(ids), types) for ids, types in sequences]
        for ids, _ in sequences:
            if not 1 <= len(ids) <= self.engine.max_length:
                raise ValueError(f"a sequence must have 1..{self.engine.max_length} tokens, got {len(ids)}")
        with self._lock:
            if self._stopped_by is not None:
                raise RuntimeError(
                    f"the engine thread stopped after an error it could not recover from ({self._stopped_by!r}): "
                    "restart the server"
                )
            if self._closing:
                raise RuntimeError("the engine is shutting down and takes no new sequences")
            if self._outstanding + len(sequences) > self.max_queue:
                raise QueueFull(
                    f"{self._outstanding} sequences are already queued and {len(sequences)} more do not fit"
                    f" (max_queue={self.max_queue})"
                )
            self._outstanding += len(sequences)
            submitted_at = time.perf_counter()  # each sequence's queue time starts here (engine.stats.queue_seconds)
            futures = []
            for _ in sequences:
                future: Future = Future()
                future.eek_key = next(self._keys)
                futures.append(future)
            if futures:  # posted under the lock: a thread that stops drains the inbox under it (_stop_failing)
                self._inbox.put(Submit(futures, sequences, submitted_at))
        return futures

    def set_policy(self, policy) -> None:
        """Serve ``policy`` from the engine's next layer call (:meth:`ContinuousEngine.set_policy`; a bad one
        is refused here, before it is queued); kept if the engine is started again after a failure."""
        self.engine.check_policy(policy)
        self._policy = policy
        self._inbox.put(SetPolicy(policy))

    def cancel(self, future: Future) -> None:
        """Drop the sequence of ``future`` unless it has finished; the future is cancelled."""
        if future.cancel():
            self._inbox.put(Cancel(future))

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking sequences; with ``drain`` finish those submitted, else cancel them; join the thread."""
        with self._lock:
            self._closing = True
        self._inbox.put(Stop(drain))
        self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            device = getattr(self.engine, "device", None)
            if device is not None and device.type == "cuda":
                # a new thread's current device is cuda:0; events and the continuous engine's graphs go on the current one
                torch.cuda.set_device(device)
            self._run()
        except BaseException as error:  # the thread ends here: nothing may wait on it for ever
            logging.getLogger("earlyexit_kernels.engine").exception("the engine thread stopped")
            self._stop_failing(error)

    def _stop_failing(self, error: BaseException) -> None:
        """The thread is ending on ``error``: refuse new sequences and fail every one submitted and not finished."""
        with self._lock:
            self._stopped_by = error
            waiting = list(self._futures.values())
            self._futures.clear()
            while True:
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, Submit):
                    waiting.extend(command.futures)
        failure = RuntimeError(f"the engine thread stopped after an error: {error!r}")
        for future in waiting:
            self._settle(future, error=failure)

    def _run(self) -> None:
        while True:
            try:
                # Block only when there is nothing to run.
                self._apply(self._inbox.get(block=self.engine.idle and self._stopping is None))
                while True:
                    self._apply(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if self._stopping is not None and self.engine.idle:
                return
            try:
                finished = self.engine.step()
            except Exception as error:  # every waiting client must hear of it
                self._fail_all(error)
                continue
            for done in finished:
                future = self._futures.pop(done.key, None)
                if future is not None:
                    self._settle(future, result=done)

    def _apply(self, command: Submit | Cancel | SetPolicy | Stop) -> None:
        if isinstance(command, Submit):
            taken = time.perf_counter()  # the engine thread took them (between two steps)
            for future, (ids, types) in zip(command.futures, command.sequences, strict=True):
                if future.cancelled():
                    self._settle(future)
                    continue
                future.eek_taken = taken
                try:
                    self.engine.submit(future.eek_key, ids, types, submitted_at=command.submitted_at)
                except Exception as error:  # this sequence's own fault (a length, a type): it alone fails
                    self._settle(future, error=error)
                    continue
                self._futures[future.eek_key] = future
        elif isinstance(command, Cancel):
            if self._futures.pop(command.future.eek_key, None) is not None:
                self.engine.cancel([command.future.eek_key])
                self._settle(command.future)
        elif isinstance(command, SetPolicy):
            self.engine.set_policy(command.policy)
        elif isinstance(command, Stop):
            self._stopping = command.drain
            if not command.drain:
                futures = list(self._futures.values())
                self.engine.cancel(list(self._futures))
                self._futures.clear()
                for future in futures:
                    future.cancel()
                    self._settle(future)

    def _settle(self, future: Future, *, result: Finished | None = None, error: Exception | None = None) -> None:
        """Give ``future`` its outcome (a cancelled one keeps none) and free its place in the queue."""
        try:
            if error is not None:
                future.set_exception(error)
            elif result is not None:
                future.set_result(result)
        except InvalidStateError:
            pass  # cancelled by its caller meanwhile
        with self._lock:
            self._outstanding -= 1

    def _fail_all(self, error: Exception) -> None:
        """A step raised: fail every sequence waiting and start from a fresh engine."""
        futures = list(self._futures.values())
        self._futures.clear()
        for future in futures:  # first: were the fresh engine not to start, none would wait on it
            self._settle(future, error=error)
        stats = self.engine.stats
        self.engine = make_engine(self._model, self._config)
        self.engine.stats = stats  # the counts (/metrics) run on from the server's start
        if self._policy is not None:
            self.engine.set_policy(self._policy)
