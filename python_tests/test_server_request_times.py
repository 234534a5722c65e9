"""Where each request's time went, and the age rule's setting, on real local servers (127.0.0.1).

Every answered request is one observation of ``eek_request_tokenization_seconds``,
``eek_request_queue_seconds``, ``eek_request_inference_seconds``, ``eek_request_answer_seconds`` and
``eek_request_duration_seconds``; the first four are consecutive spans of the request's
timeline, so they and the total lie within the client's wall time of the request; the inference is
the time in layer calls (``eek_request_layers_seconds``) and the time waiting for one
(``eek_request_waiting_seconds``); its headers carry the same spans in milliseconds. ``--max-age`` (``create_app(max_age=...)``) reaches the
engine, ``/info`` reports it, and a bad value is refused in one line.
"""

import re
import time

import pytest
from conftest import word_texts
from served_models import RunningServer, serving

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.request_costs import HEADERS  # noqa: E402

SPANS = ("tokenization", "queue", "inference", "layers", "waiting", "answer")
HISTOGRAMS = {name: f"eek_request_{name}_seconds" for name in SPANS} | {"total": "eek_request_duration_seconds"}


@pytest.fixture(scope="module")
def server(loaded_classifier):
    with serving(*loaded_classifier, model_id="tiny", max_batch_size=4, max_age=3) as running:
        yield running


def scrape(url: str) -> dict[str, float]:
    """Every unlabelled sample of ``/metrics``, and the histograms' ``+Inf`` buckets, by name."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = dict(re.findall(r"^([a-z_]+(?:\{le=\"\+Inf\"\})?) (\S+)$", text, flags=re.MULTILINE))
    return {name: float(value) for name, value in samples.items()}


CASES = [
    ("/predict", {"inputs": "w1 w2 w3"}, 1),
    ("/predict", {"inputs": [["w4"], ["w5 w6"], ["w7 w8 w9"]]}, 3),
    ("/classify", {"input": [t or "w1" for t in word_texts(11, seed=5, longest=12)]}, 11),  # 3 layer calls' rows
    ("/", {"inputs": "w3 w1"}, 1),
]


@pytest.mark.parametrize(("route", "body", "texts"), CASES)
def test_each_request_is_one_observation_of_each_span_within_its_wall_time(server, route, body, texts):
    before = scrape(server.url)
    started = time.perf_counter()
    response = server.post(route, body)
    wall = time.perf_counter() - started
    after = scrape(server.url)
    assert response.status_code == 200, response.text
    assert after["eek_sequences_total"] - before["eek_sequences_total"] == texts

    spent = {}
    for span, name in HISTOGRAMS.items():
        assert after[name + "_count"] - before[name + "_count"] == 1, name  # one observation per request
        assert after[name + '_bucket{le="+Inf"}'] == after[name + "_count"]
        spent[span] = after[name + "_sum"] - before[name + "_sum"]
        assert spent[span] >= 0, name
    # consecutive spans of the request's own timeline: together within the total, itself within the wall time
    assert spent["tokenization"] + spent["queue"] + spent["inference"] + spent["answer"] <= spent["total"] + 1e-9
    assert 0 < spent["total"] <= wall
    assert spent["inference"] > 0  # the layers ran
    # the inference is its time in layer calls and its time waiting for one
    assert spent["layers"] > 0 and spent["waiting"] >= 0
    assert abs(spent["layers"] + spent["waiting"] - spent["inference"]) < 1e-9

    # the headers are the same spans, in milliseconds (TEI's names; x-compute-time is TEI's total)
    for span, header in HEADERS.items():
        assert abs(int(response.headers[header]) - 1000 * spent[span]) <= 0.5 + 1e-6, header
    assert response.headers["x-compute-time"] == response.headers["x-total-time"]
    assert int(response.headers["x-compute-tokens"]) >= 3 * texts  # [CLS], a word, [SEP] at least


def test_a_one_text_request_s_queue_and_inference_contain_its_sequence_s(server):
    """The request's queue ends, and its inference starts, where its sequence's do: at the admission."""
    names = ("eek_sequence_queue_seconds", "eek_sequence_inference_seconds", *HISTOGRAMS.values())
    for text in ("w1", "w2 w3 w4 w5 w6 w7 w8", "w9 w10"):
        before = scrape(server.url)
        assert server.post("/predict", {"inputs": text}).status_code == 200
        after = scrape(server.url)
        spent = {name: after[name + "_sum"] - before[name + "_sum"] for name in names}
        sequence_queue, request_queue = spent["eek_sequence_queue_seconds"], spent["eek_request_queue_seconds"]
        # the request's queue starts when its text is tokenized, its sequence's at the engine's submit, just after
        assert sequence_queue <= request_queue + 1e-9 and request_queue - sequence_queue < 0.05
        assert spent["eek_sequence_inference_seconds"] <= spent["eek_request_inference_seconds"] + 1e-9


def test_a_refused_request_is_no_observation_and_still_carries_its_headers(server):
    before = scrape(server.url)
    response = server.post("/predict", {"inputs": " ".join(["w1"] * 100)})  # more tokens than the positions
    assert response.status_code == 413
    after = scrape(server.url)
    for name in HISTOGRAMS.values():
        assert after[name + "_count"] == before[name + "_count"], name
    assert int(response.headers["x-total-time"]) >= 0
    assert response.headers["x-compute-time"] == response.headers["x-total-time"]
    # refused while tokenizing: the spans it never finished are left out
    assert not {"x-tokenization-time", "x-queue-time", "x-inference-time", "x-layer-time"} & set(response.headers)


def test_max_age_reaches_the_engine_and_info_reports_it(server, loaded_classifier):
    assert httpx.get(server.url + "/info", timeout=10).json()["max_age"] == 3
    assert server.app.state.eek.worker.engine.scheduler.aging.max_age == 3
    model, tokenizer = loaded_classifier
    # auto: 2 x the 4 layers; not given: a server's default, strictly oldest first
    for given, engine in (("auto", 8), (None, None), (0, 0), ("not given", 0)):
        options = {} if given == "not given" else {"max_age": given}
        running = RunningServer(create_app(model, tokenizer, **options))
        try:
            assert httpx.get(running.url + "/info", timeout=10).json()["max_age"] == engine
            aging = running.app.state.eek.worker.engine.scheduler.aging
            assert (aging and aging.max_age) == engine
            assert running.post("/predict", {"inputs": "w1 w2"}).status_code == 200
        finally:
            running.close()


@pytest.mark.parametrize("bad", [-1, "off", "2", 1.5, True])
def test_a_bad_max_age_is_refused_when_the_app_is_made(loaded_classifier, bad):
    model, tokenizer = loaded_classifier
    with pytest.raises(ValueError, match="max_age must be 'auto'"):
        create_app(model, tokenizer, max_age=bad)


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"max_age": -2}, ValueError, "max_age must be 'auto'"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size"),
        ({"max_body_bytes": -1}, ValueError, "max_body_bytes"),
        ({"audit_fraction": 1.5}, ValueError, "fraction"),
        ({"max_batch": 8}, TypeError, "max_batch"),
        ({"policy": "Entropy(0.5)", "recertify": True, "audit_fraction": 0.5}, ValueError, "moves the folder's"),
    ],
)
def test_ray_serve_refuses_a_bad_setting_before_any_replica_starts(saved_classifier, options, error, says):
    pytest.importorskip("ray.serve", reason="Ray Serve replicas need ray[serve]")
    from earlyexit_kernels.integrations.server.ray_serve import serve_application

    with pytest.raises(error, match=says):
        serve_application(saved_classifier, **options)


@pytest.mark.parametrize(
    ("given", "passed"), [("auto", "auto"), ("AUTO", "auto"), ("off", None), ("0", 0), ("12", 12), (None, 0)]
)
def test_the_command_line_passes_max_age_to_the_server(saved_classifier, monkeypatch, given, passed):
    import uvicorn

    from earlyexit_kernels.integrations.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app))
    assert main(["serve", saved_classifier, *([] if given is None else ["--max-age", given])]) == 0
    assert served["app"].state.eek.engine_config.max_age == passed


@pytest.mark.parametrize("bad", ["-1", "none", "1.5", "", "2x"])
def test_the_command_line_refuses_a_bad_max_age_in_one_line(saved_classifier, capsys, bad):
    from earlyexit_kernels.integrations.cli import main

    assert main(["serve", saved_classifier, "--max-age", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-age must be auto (2 x the model's layers), off (no age rule) or a whole")
    assert err.count("\n") == 1 and repr(bad) in err
