"""Bounded waiting through the continuous engine itself (a tiny random BERT), and each
sequence's queue and inference times as the engine counts them."""

import random

import pytest
from conftest import mlp_head_model

import earlyexit_kernels as eek
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.engines.continuous.scheduler import default_call_cost
from earlyexit_kernels.engine.stream.timings import SecondsHistogram

LAYERS = 6


@pytest.fixture(scope="module")
def model():
    model = mlp_head_model(0, num_layers=LAYERS)
    # random heads: about a fifth leave at layer 1, a sixth at 2, the rest at 3
    eek.patch(model, eek.Entropy(0.5), backend="torch", pooling="mean", head="mlp")
    return model


def _closed_loop(engine, concurrency: int, lengths: list[int]) -> list[int]:
    """``concurrency`` clients, each submitting its next text when its last left; per text, the layer
    calls run from its submission to its exit."""
    rng = random.Random(0)
    submitted, waited, sent = {}, {}, 0

    def submit():
        nonlocal sent
        engine.submit(sent, rng.choices(range(5, 90), k=lengths[sent]))
        submitted[sent] = engine.stats.calls
        sent += 1

    for _ in range(concurrency):
        submit()
    while not engine.idle:
        for done in engine.step():
            waited[done.key] = engine.stats.calls - submitted[done.key]
            if sent < len(lengths):
                submit()
    return [waited[key] for key in range(len(lengths))]


def test_a_long_text_among_short_ones_leaves_within_the_bound(model):
    """One text in 50 is long (60 tokens) among short ones (8-20): without the age rule the long one
    is the open end of its layer's queue, waiting for rows that could join it, up to max_wait calls."""
    rng = random.Random(1)
    lengths = [60 if i % 50 == 25 else rng.randint(8, 20) for i in range(400)]
    concurrency = 8
    # MiniLM's call cost on a CPU (hidden 384): groups of different lengths seldom merge
    engine = ContinuousEngine(model, max_batch_size=64, call_cost=default_call_cost(384))
    max_age = engine.scheduler.aging.max_age
    assert max_age == 2 * LAYERS  # the default
    waited = _closed_loop(engine, concurrency, lengths)
    # the bound, max_age + L x n, with n <= the concurrency (one text per client)
    assert max(waited) <= max_age + LAYERS * concurrency


def test_each_sequence_counts_its_queue_and_inference_time_once(model):
    engine = ContinuousEngine(model, max_batch_size=4)
    for key in range(6):
        engine.submit(key, [7] * (5 + key))
    engine.submit("gone", [7] * 5)
    assert engine.cancel(["gone"]) == 1  # never admitted: no time counted
    finished = list(engine.run())
    stats = engine.stats
    assert len(finished) == 6
    assert stats.queue_seconds.count == stats.inference_seconds.count == 6
    assert stats.inference_seconds.total > 0  # every sequence ran a layer call at least


def test_the_time_histogram_counts_each_duration_in_the_first_bucket_that_holds_it():
    histogram = SecondsHistogram(bounds=(0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.01", 2), ("0.1", 3), ("+Inf", 4)]  # upper bounds included, as Prometheus'
    assert histogram.count == 4 and histogram.total == pytest.approx(3.065)
