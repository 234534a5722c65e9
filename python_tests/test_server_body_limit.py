"""A request body over ``max_body_bytes`` gets 413 before it is read whole, on a real server on 127.0.0.1.

Before the bound, one 10 MB request (a text of 2,000,000 words) was read, parsed and tokenized
whole before its 413, and every other request waited behind it (issue 63). Now the
``Content-Length`` decides at once; a chunked body is counted as it arrives.
"""

import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from served_models import RunningServer  # noqa: E402

from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.body_limit import DEFAULT_MAX_BODY_BYTES  # noqa: E402

HUGE = '{"inputs": "' + "w1 " * 3_400_000 + '"}'  # about 10 MB: one text of 3.4 million words


@pytest.fixture(scope="module")
def server(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    running = RunningServer(create_app(model, tokenizer, model_id="tiny", max_batch_size=16))
    yield running
    running.close()


def _refused(answer):
    assert answer.status_code == 413, answer.text
    body = answer.json()
    assert body["error_type"] == "Validation"
    assert f"at most {DEFAULT_MAX_BODY_BYTES} bytes" in body["error"] and "--max-body-bytes" in body["error"]
    assert answer.headers.get("x-request-id")


def test_a_10_mb_body_gets_413_within_a_second_and_a_small_request_beside_it_is_served(server):
    small = {"inputs": [["w1 w2 w3"]]}
    server.post("/predict", small)  # warm
    started = time.perf_counter()
    usual = server.post("/predict", small)
    usual_s = time.perf_counter() - started
    assert usual.status_code == 200

    answers, seconds = {}, {}

    def send_huge():
        began = time.perf_counter()
        answers["huge"] = httpx.post(
            server.url + "/predict", content=HUGE, headers={"content-type": "application/json"}, timeout=60
        )
        seconds["huge"] = time.perf_counter() - began

    thread = threading.Thread(target=send_huge)
    thread.start()
    began = time.perf_counter()
    beside = server.post("/predict", small)
    seconds["small"] = time.perf_counter() - began
    thread.join(60)
    _refused(answers["huge"])
    # 1 s for the refusal (it was 4.6-24.9 s); the small request within its usual time plus 1 s
    assert seconds["huge"] < 1.0, seconds
    assert beside.status_code == 200 and seconds["small"] < usual_s + 1.0, (seconds, usual_s)


def test_a_chunked_body_is_counted_as_it_arrives(server):
    def chunks():
        yield b'{"inputs": "'
        for _ in range(400):
            yield b"w1 " * 10_000  # 30 kB a chunk, 12 MB in all, no Content-Length
        yield b'"}'

    began = time.perf_counter()
    answer = httpx.post(
        server.url + "/predict", content=chunks(), headers={"content-type": "application/json"}, timeout=60
    )
    _refused(answer)
    assert "passed" in answer.json()["error"]
    assert time.perf_counter() - began < 5.0


def test_the_bound_is_the_servers_option_and_a_body_under_it_is_served(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    running = RunningServer(create_app(model, tokenizer, model_id="tiny", max_body_bytes=200))
    try:
        assert running.post("/predict", {"inputs": "w1 w2"}).status_code == 200
        answer = running.post("/predict", {"inputs": "w1 " * 100})
        assert answer.status_code == 413 and "at most 200 bytes" in answer.json()["error"]
        assert running.post("/predict", {"inputs": "w3 w4"}).status_code == 200  # still serving
    finally:
        running.close()
    with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1"):
        create_app(model, tokenizer, max_body_bytes=0)


def test_eek_serves_default_is_the_servers():
    from earlyexit_kernels.integrations.cli import build_parser

    assert build_parser().parse_args(["serve", "MODEL"]).max_body_bytes == DEFAULT_MAX_BODY_BYTES
