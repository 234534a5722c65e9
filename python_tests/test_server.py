"""The HTTP server, on a real uvicorn server on 127.0.0.1.

Its answers are ``eek.classify``'s on the same texts; its request and answer shapes are
text-embeddings-inference's ``/predict``; bad requests get a 4xx saying what to change
and the server keeps serving; a full queue answers 429 at once and loses nothing it
accepted; a client that goes away has its sequences dropped; SIGTERM answers what is in
flight, then exits.
"""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import WORDS, word_bert, word_texts

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from served_models import RunningServer, serving  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.engine.layers.ort_layer import ort_available  # noqa: E402
from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402


class PredictServer(RunningServer):
    """A running server whose ``post`` sends to ``/predict`` (a JSON body, or raw text or bytes)."""

    def post(self, body, timeout=60):
        content = body if isinstance(body, str | bytes) else None
        return httpx.post(self.url + "/predict", json=None if content else body, content=content, timeout=timeout)

    def metric(self, name: str) -> float:
        return scrape(self.url, name)


def scrape(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def server(loaded_classifier):
    with serving(*loaded_classifier, PredictServer, model_id="tiny", max_batch_size=16) as running:
        yield running


def expected_answers(model, tokenizer, inputs, **options):
    """(label name, probability, exit_layer, layers_run) per input, from eek.classify."""
    answers = []
    for prediction in eek.classify(model, inputs, tokenizer=tokenizer, **options):
        probabilities = prediction.logits.float().softmax(-1)
        best = int(probabilities.argmax())
        answers.append(
            (model.config.id2label[best], float(probabilities[best]), prediction.exit_layer, prediction.layers_run)
        )
    return answers


def best_of(answer):
    first = answer[0]
    return first["label"], first["score"], first["exit_layer"], first["layers_run"]


def test_a_batch_of_texts_and_pairs_gets_the_answers_of_eek_classify(server, loaded_classifier):
    model, tokenizer = loaded_classifier
    texts = [t or "w0" for t in word_texts(30, seed=11)]
    inputs = [(t, texts[-1 - i]) if i % 3 == 0 else t for i, t in enumerate(texts)]
    body = {"inputs": [list(item) if isinstance(item, tuple) else [item] for item in inputs]}

    response = server.post(body)

    assert response.status_code == 200
    answers = response.json()
    assert len(answers) == len(inputs)
    for answer, (label, score, exit_layer, layers_run) in zip(
        answers, expected_answers(model, tokenizer, inputs), strict=True
    ):
        got_label, got_score, got_exit, got_runs = best_of(answer)
        assert (got_label, got_exit, got_runs) == (label, exit_layer, layers_run)
        assert got_score == pytest.approx(score, abs=1e-5)
    assert len({best_of(a)[2] for a in answers}) > 1, "exits should spread over layers for this test to mean much"


def test_one_text_and_one_pair_get_a_flat_list_of_every_label_best_first(server, loaded_classifier):
    model, tokenizer = loaded_classifier
    for inputs, item in (("w1 w2 w3", "w1 w2 w3"), (["w4 w5", "w6"], ("w4 w5", "w6"))):
        answer = server.post({"inputs": inputs}).json()

        assert [entry["label"] for entry in answer] != [] and isinstance(answer[0], dict)
        assert sorted(entry["label"] for entry in answer) == sorted(model.config.id2label.values())
        scores = [entry["score"] for entry in answer]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert best_of(answer)[::2] == expected_answers(model, tokenizer, [item])[0][::2]


def test_raw_scores_are_the_logits(server, loaded_classifier):
    model, tokenizer = loaded_classifier
    answer = server.post({"inputs": "w7 w8", "raw_scores": True}).json()
    logits = next(iter(eek.classify(model, ["w7 w8"], tokenizer=tokenizer))).logits.float()
    by_label = {entry["label"]: entry["score"] for entry in answer}
    for index, name in model.config.id2label.items():
        assert by_label[name] == pytest.approx(float(logits[int(index)]), abs=1e-5)


def test_concurrent_clients_each_get_their_own_answers(server, loaded_classifier):
    model, tokenizer = loaded_classifier
    texts = [t or "w1" for t in word_texts(96, seed=12)]
    expected = expected_answers(model, tokenizer, texts)

    def ask(i):
        return server.post({"inputs": [[texts[i]], [texts[i + 48]]]})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(48)))

    for i, response in enumerate(responses):
        assert response.status_code == 200
        first, second = response.json()
        for answer, want in ((first, expected[i]), (second, expected[i + 48])):
            assert best_of(answer)[::2] == want[::2]
            assert best_of(answer)[1] == pytest.approx(want[1], abs=1e-5)


@pytest.mark.parametrize(
    "body, status, says",
    [
        ('{"inputs": ', 400, "not valid JSON"),
        ("[1, 2]", 422, '"inputs"'),
        ({"text": "w1"}, 422, '"inputs"'),
        ({"inputs": 3}, 422, "inputs must be"),
        ({"inputs": ["w1", "w2", "w3"]}, 422, "wrap each text"),
        ({"inputs": [["w1"], "w2"]}, 422, "inputs[1]"),
        ({"inputs": [["w1", "w2", "w3"]]}, 422, "one text or a pair"),
        ({"inputs": [[1]]}, 422, "one text or a pair"),
        ({"inputs": "w1", "truncate": "yes"}, 422, "truncate must be true or false"),
        ({"inputs": "w1", "normalize": True}, 422, "unknown field"),
        ({"inputs": []}, 400, "empty list"),
        ({"inputs": ""}, 400, "empty text"),
        ({"inputs": " ".join(WORDS[:1] * 80)}, 413, 'send "truncate": true'),
    ],
)
def test_a_bad_request_gets_a_4xx_that_says_what_to_change_and_the_server_keeps_serving(server, body, status, says):
    response = server.post(body)

    assert response.status_code == status
    assert says in response.json()["error"]
    assert server.post({"inputs": "w1"}).status_code == 200


def test_truncate_classifies_the_first_max_length_tokens(server, loaded_classifier):
    model, tokenizer = loaded_classifier
    long_text = " ".join(WORDS * 2)

    answer = server.post({"inputs": long_text, "truncate": True}).json()

    limit = model.config.max_position_embeddings
    ids = tokenizer(long_text, truncation=True, max_length=limit)["input_ids"]
    assert len(ids) == limit
    want = expected_answers(model, tokenizer, [{"input_ids": ids}])[0]
    assert best_of(answer)[::2] == want[::2]


def test_health_and_info_describe_the_model(server, loaded_classifier):
    model, _ = loaded_classifier
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/info").json()
    assert info["model_type"] == "bert" and info["num_layers"] == 4
    assert info["labels"] == ["neg", "neutral", "pos"]
    assert info["policy"] == repr(eek.policy_of(model))
    assert (info["max_batch_size"], info["max_queue"], info["max_length"]) == (16, 1024, 64)
    assert info["layers"] == "torch"  # create_app serves the model as given; eek serve --layers decides


def test_a_stopped_engine_thread_gets_503_from_health_and_every_request(loaded_classifier, monkeypatch):
    """An engine thread that ends on an error it cannot recover from (a failed layer call, then no memory for a
    fresh engine) fails the request it held with 500, and every later one gets 503 at once, where the queue once
    filled with sequences no thread would take and answered 429."""
    import earlyexit_kernels.engine.entry.background as background

    model, tokenizer = loaded_classifier
    with serving(model, tokenizer, model_id="tiny", max_batch_size=4) as running:
        worker = running.app.state.eek.worker

        def explode():
            raise RuntimeError("kernel exploded")

        def no_engine(*args, **kwargs):
            raise MemoryError("no memory for a fresh engine")

        monkeypatch.setattr(worker.engine, "step", explode)
        monkeypatch.setattr(background, "make_engine", no_engine)
        held = httpx.post(running.url + "/predict", json={"inputs": "the film was fine"}, timeout=60)
        assert held.status_code == 500
        worker._thread.join(30)
        assert httpx.get(running.url + "/health").status_code == 503
        later = httpx.post(running.url + "/predict", json={"inputs": "the film was fine"}, timeout=60)
        assert later.status_code == 503 and "restart the server" in later.json()["error"]


def test_metrics_count_requests_sequences_and_exit_layers(server):
    before_sequences = server.metric("eek_sequences_total")
    before_ok = server.metric('eek_requests_total{status="200"}')
    before_exits = server.metric("eek_exit_layer_sum")

    answers = server.post({"inputs": [["w1 w2"], ["w3"], ["w4 w5 w6"]]}).json()

    assert server.metric("eek_sequences_total") == before_sequences + 3
    assert server.metric('eek_requests_total{status="200"}') == before_ok + 1
    assert server.metric("eek_exit_layer_sum") == before_exits + sum(best_of(a)[2] for a in answers)
    assert server.metric("eek_request_duration_seconds_count") >= 1
    assert server.metric("eek_rows_per_layer_call") >= 1
    assert server.metric("eek_queue_depth") == 0


def test_metrics_hold_each_sequences_queue_and_inference_time(server):
    names = ("eek_sequence_queue_seconds", "eek_sequence_inference_seconds")
    before = {name: (server.metric(name + "_count"), server.metric(name + "_sum")) for name in names}
    started = time.perf_counter()
    assert server.post({"inputs": [["w1 w2"], ["w3"], ["w4 w5 w6"]]}).status_code == 200
    took = time.perf_counter() - started
    spent = 0.0
    for name in names:
        count, total = server.metric(name + "_count"), server.metric(name + "_sum")
        assert count == before[name][0] + 3  # one observation per sequence
        assert server.metric(name + '_bucket{le="+Inf"}') == count
        assert total >= before[name][1]
        spent += total - before[name][1]
    assert 0 < spent <= 3 * took  # each sequence's queue and inference time lie within the request's


def test_metrics_give_the_process_s_memory_and_glibc_s_account_of_its_heap(server):
    from earlyexit_kernels.integrations.server.memory_trim import heap_account

    resident = server.metric("eek_process_resident_bytes")
    assert resident > 10 * 1024 * 1024  # a process with torch loaded holds tens of MiB at least
    if heap_account() is None:
        pytest.skip("the C library here has no mallinfo2 (not glibc >= 2.33): no heap account")
    in_use, free = server.metric("eek_heap_in_use_bytes"), server.metric("eek_heap_free_bytes")
    assert 0 < in_use < resident + server.metric("eek_heap_mapped_bytes") + free
    assert free >= 0


# A model slow enough on this CPU that a request of 64 long texts is in flight for a while
# (its policy never exits, so all 64 sequences leave together after the last layer).
@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("slow")
    model, tokenizer = word_bert(
        path,
        2,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=160,
    )
    eek.patch(model, eek.Entropy(0.0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LONG_TEXTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(150)) for i in range(64)]


def wait_for(condition, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.serial  # the 429 must come within 0.5 s while the engine works
def test_a_full_queue_answers_429_at_once_and_loses_nothing_it_accepted(slow_model_dir):
    model, tokenizer = load_model(slow_model_dir)
    server = PredictServer(create_app(model, tokenizer, max_queue=64, max_batch_size=64))
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(server.post, {"inputs": [[t] for t in LONG_TEXTS]})
            wait_for(lambda: server.metric("eek_queue_depth") == 64, what="the 64 sequences to be queued")

            started = time.perf_counter()
            refused = server.post({"inputs": "w1"})
            refused_after = time.perf_counter() - started
            still_queued = server.metric("eek_queue_depth")

            accepted = big.result()
        assert refused.status_code == 429 and refused.json()["error_type"] == "Overloaded"
        assert still_queued == 64, "the refused request must have been answered while the queue was full"
        assert refused_after < 0.5
        assert accepted.status_code == 200 and len(accepted.json()) == 64
        assert server.post({"inputs": [[t] for t in [*LONG_TEXTS, "w1"]]}).status_code == 413  # can never fit
        assert server.post({"inputs": "w1"}).status_code == 200
    finally:
        server.close()


def test_a_client_that_goes_away_has_its_sequences_dropped(slow_model_dir):
    model, tokenizer = load_model(slow_model_dir)
    server = PredictServer(create_app(model, tokenizer, max_queue=64, max_batch_size=64))
    try:
        with pytest.raises(httpx.TimeoutException):
            server.post({"inputs": [[t] for t in LONG_TEXTS]}, timeout=httpx.Timeout(10, read=0.05))
        wait_for(lambda: server.metric("eek_queue_depth") == 0, what="the dropped sequences to leave the queue")
        assert server.metric("eek_sequences_total") == 0
        assert server.metric('eek_requests_total{status="499"}') == 1
    finally:
        server.close()


def test_sigterm_answers_the_requests_in_flight_then_exits(slow_model_dir):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "earlyexit_kernels", "serve", slow_model_dir, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, what="the server to start")
        info = httpx.get(url + "/info", timeout=10).json()
        memory = info["memory"]  # eek serve set its allocator behaviour
        assert "malloc_trim" in memory or "preloaded" in memory or "not glibc" in memory
        assert info["gc_frozen_objects"] > 10_000  # the start-up heap (torch, the model, the app) frozen
        assert info["layers"] == ("onnxruntime" if ort_available() else "torch")  # --layers auto
        with ThreadPoolExecutor(4) as pool:
            requests = [
                pool.submit(httpx.post, url + "/predict", json={"inputs": [[t] for t in LONG_TEXTS[i::4]]}, timeout=60)
                for i in range(4)
            ]
            wait_for(lambda: scrape(url, "eek_queue_depth") == 64, what="the 4 requests to be queued")
            process.send_signal(signal.SIGTERM)
            answers = [request.result() for request in requests]
        assert [a.status_code for a in answers] == [200] * 4
        assert [len(a.json()) for a in answers] == [16] * 4
        # uvicorn re-raises the signal once it has shut down, as a process stopped by SIGTERM should.
        assert process.wait(60) in (0, -signal.SIGTERM)
        log = process.communicate()[0].decode()
        assert "Application shutdown complete" in log
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.ray  # a Ray Serve deployment starts in about 30 s: make test-ray
def test_replicas_on_ray_serve_answer_like_one_server(saved_classifier, loaded_classifier):
    ray = pytest.importorskip("ray", reason="Ray Serve replicas need ray[serve]")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve replicas need ray[serve]")
    import socket

    from earlyexit_kernels.integrations.server.ray_serve import serve_application

    model, tokenizer = loaded_classifier
    texts = [t or "w2" for t in word_texts(24, seed=13)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = serve_application(saved_classifier, replicas=2, max_batch_size=16, max_age=3)
        serve.run(application, name="eek", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda t: httpx.post(url + "/predict", json={"inputs": t}, timeout=60), texts))
        info = httpx.get(url + "/info", timeout=30).json()
    finally:
        serve.shutdown()
        ray.shutdown()

    assert info["num_layers"] == 4 and info["max_age"] == 3  # the replicas' engines took the app's options
    assert "malloc_trim" in info["memory"] or "preloaded" in info["memory"]  # each replica trims, as eek serve
    assert info["layers"] == ("onnxruntime" if ort_available() else "torch")  # and runs its layers where it does
    for response, want in zip(responses, expected_answers(model, tokenizer, texts), strict=True):
        assert response.status_code == 200
        assert best_of(response.json())[::2] == want[::2]
