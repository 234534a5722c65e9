"""The continuous engine behind a queue and a thread: what the HTTP server builds on."""

import threading
from concurrent.futures import CancelledError

import pytest
import torch
from conftest import tiny_model
from test_classify import _alone, _sequences

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.entry.background import BackgroundEngine, QueueFull


def _model():
    return eek.patch(tiny_model("bert", num_layers=3), eek.Patience(1))


def test_sequences_submitted_from_many_threads_each_get_their_own_answer():
    model = _model()
    items = _sequences(60, seed=11)
    worker = BackgroundEngine(model, max_batch_size=8)
    futures = [None] * len(items)

    def client(start):
        for i in range(start, len(items), 4):
            futures[i] = worker.submit(items[i]["input_ids"], items[i]["token_type_ids"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for future, item in zip(futures, items):
        done = future.result(timeout=30)
        alone = _alone(model, item)
        assert done.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(done.logits, alone.logits[0], rtol=0, atol=1e-5)
    worker.close()
    assert worker.outstanding == 0


class _Paused:
    """Holds the engine thread inside its next step until released."""

    def __init__(self, engine):
        self.entered, self.release = threading.Event(), threading.Event()
        self._step = engine.step
        engine.step = self

    def __call__(self):
        self.entered.set()
        self.release.wait(30)
        return self._step()


def _held_worker(**limits):
    """``(worker, paused, first)``: a worker whose engine thread is held inside the step that took its ``first``
    sequence ([5, 6, 7]); what is submitted now waits in the queue until ``paused.release`` is set."""
    worker = BackgroundEngine(_model(), max_batch_size=4, **limits)
    paused = _Paused(worker.engine)
    first = worker.submit([5, 6, 7])
    assert paused.entered.wait(30)
    return worker, paused, first


def test_a_full_queue_is_refused_at_once():
    worker, paused, first = _held_worker(max_queue=2)
    second = worker.submit([5, 6])
    with pytest.raises(QueueFull, match="max_queue=2"):
        worker.submit([8, 9])
    paused.release.set()
    assert first.result(30).exit_layer >= 1 and second.result(30).exit_layer >= 1
    worker.submit([8, 9]).result(30)  # room again once they finished
    worker.close()


def test_a_requests_sequences_are_taken_together_between_the_same_two_steps():
    worker, paused, first = _held_worker(max_queue=8)
    request = worker.submit_many([([5, 6], None), ([7, 8, 9], [0, 0, 1]), ([4], None)])
    paused.release.set()
    assert [f.result(30).exit_layer >= 1 for f in [first, *request]] == [True] * 4
    assert len({f.eek_taken for f in request}) == 1 and request[0].eek_taken > first.eek_taken
    worker.close()
    assert worker.outstanding == 0


def test_a_request_that_does_not_fit_is_refused_whole():
    worker, paused, first = _held_worker(max_queue=4)
    with pytest.raises(QueueFull, match="1 sequences are already queued and 4 more do not fit"):
        worker.submit_many([([5, 6], None)] * 4)
    with pytest.raises(ValueError, match="a sequence must have 1..64 tokens, got 0"):
        worker.submit_many([([5, 6], None), ([], None)])
    assert worker.outstanding == 1, "nothing of a refused request is queued"
    rest = worker.submit_many([([5, 6], None)] * 3)
    paused.release.set()
    assert all(f.result(30).exit_layer >= 1 for f in [first, *rest])
    worker.close()


def test_a_cancelled_sequence_is_dropped_and_frees_its_place():
    worker, paused, kept = _held_worker(max_queue=8)
    dropped = worker.submit([5, 6, 7, 8])
    worker.cancel(dropped)
    paused.release.set()
    assert kept.result(30).exit_layer >= 1
    with pytest.raises(CancelledError):
        dropped.result(30)
    worker.close()
    assert worker.outstanding == 0


def test_close_without_drain_cancels_what_waits():
    worker = BackgroundEngine(_model(), max_batch_size=4)
    paused = _Paused(worker.engine)
    futures = [worker.submit([5, 6, 7]) for _ in range(5)]
    assert paused.entered.wait(30)
    closer = threading.Thread(target=worker.close, kwargs={"drain": False})
    closer.start()
    paused.release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="shutting down"):
        worker.submit([5, 6])
    assert not worker.alive and worker.stopped_by is None  # closed as asked: not an error (the server says so)


def test_a_failing_step_fails_the_waiting_sequences_and_the_worker_goes_on():
    worker, paused, doomed = _held_worker()
    stats = worker.engine.stats
    paused._step = lambda: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
    paused.release.set()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        doomed.result(30)
    assert worker.submit([5, 6, 7]).result(30).exit_layer >= 1  # a fresh engine serves the next ones
    assert worker.engine.stats is stats and stats.calls > 0  # and counts on in the failed one's counts
    worker.close()


def test_a_thread_that_cannot_start_a_fresh_engine_fails_every_waiting_sequence_and_refuses_new_ones(monkeypatch):
    """Were a failed step followed by a fresh engine that cannot be built, the thread ends: every sequence it
    held or had not taken yet fails (none waits for ever), and a later submit is refused at once (the server
    answers 503, where it answered 429 once the queue filled with sequences no thread would take)."""
    import earlyexit_kernels.engine.entry.background as background

    worker, paused, taken = _held_worker()
    not_taken = worker.submit([8, 9])  # posted while the thread is inside the step

    def no_engine(*args, **kwargs):
        raise MemoryError("no memory for a fresh engine")

    monkeypatch.setattr(background, "make_engine", no_engine)
    paused._step = lambda: (_ for _ in ()).throw(RuntimeError("kernel exploded"))
    paused.release.set()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        taken.result(30)
    with pytest.raises(RuntimeError, match="engine thread stopped.*no memory"):
        not_taken.result(30)
    worker._thread.join(30)
    assert not worker.alive and worker.outstanding == 0
    assert isinstance(worker.stopped_by, MemoryError)
    with pytest.raises(RuntimeError, match="engine thread stopped .*restart the server"):
        worker.submit([5, 6, 7])


def test_bad_sequences_are_refused_when_submitted():
    worker = BackgroundEngine(_model(), max_batch_size=4)
    with pytest.raises(ValueError, match="1..64 tokens"):
        worker.submit([])
    with pytest.raises(ValueError, match="1..64 tokens"):
        worker.submit(list(range(3, 70)))
    worker.close()


def test_a_sequence_the_engine_refuses_fails_alone_and_the_thread_goes_on():
    worker = BackgroundEngine(_model(), max_batch_size=4)
    with pytest.raises(TypeError, match="flat sequence of integers"):
        worker.submit([5.5, 6.0]).result(30)  # refused by the engine thread, not by submit
    assert worker.submit([5, 6, 7]).result(30).exit_layer >= 1
    worker.close()


def test_the_engine_cancels_pending_and_in_flight_sequences():
    engine = ContinuousEngine(_model(), max_batch_size=4, max_in_flight=4)
    for key in range(10):
        engine.submit(key, [5, 6, 7, 8][: 2 + key % 3])
    engine.step()  # admits the first four
    assert engine.in_flight == 4 and engine.pending == 6
    assert engine.cancel([0, 1, 7, 99]) == 3
    assert engine.in_flight == 2 and engine.pending == 5
    assert sorted(done.key for done in engine.run()) == [2, 3, 4, 5, 6, 8, 9]
