"""The clients users have, against a real server on 127.0.0.1: Cohere's current SDK (``ClientV2``,
``/v2/rerank``), Infinity's client (``GET /models``, ``model="default/not-specified"``), and model
ids that are names, never paths (issue 63).

Each client's requests were recorded from the client itself (``recorded_client_requests.json``:
the client's version and the call that sent it) and are replayed here; where the client package
is installed, it is called for real too (skipped otherwise: neither is a requirement).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from served_models import RunningServer, cross_encoder_folder  # noqa: E402

from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.served_model import served_model_name  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "recorded_client_requests.json").read_text())


def _recorded(path: str) -> dict:
    (request,) = [r for r in RECORDED if r["path"] == path]
    return request


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    folder = cross_encoder_folder(tmp_path_factory.mktemp("cross_encoder"))
    model, tokenizer = load_model(folder)
    running = RunningServer(create_app(model, tokenizer, model_id="tiny-reranker", max_batch_size=8))
    yield running
    running.close()


@pytest.fixture(scope="module")
def classifier(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    running = RunningServer(create_app(model, tokenizer, model_id=served_model_name(saved_classifier)))
    yield running
    running.close()


def _send(server, request):
    return httpx.request(request["method"], server.url + request["path"], json=request["body"], timeout=60)


def test_cohere_v2s_rerank_gets_its_v2_answer(reranker):
    answer = _send(reranker, _recorded("/v2/rerank"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["meta"]["api_version"]["version"] == "2" and body["id"] == answer.headers["x-request-id"]
    (best,) = body["results"]  # top_n 1
    assert set(best) == {"index", "relevance_score", "exit_layer", "layers_run"} and best["index"] in (0, 1)
    # the same ranking as Cohere's v1 shape on the same texts
    v1 = _send(reranker, _recorded("/v1/rerank")).json()
    assert v1["results"][0]["index"] == best["index"]
    assert v1["results"][0]["relevance_score"] == pytest.approx(best["relevance_score"])


def test_v2_refuses_what_it_cannot_honour_with_the_reason(reranker):
    request = dict(_recorded("/v2/rerank"))
    for body, says in [
        ({**request["body"], "documents": [{"text": "w1"}]}, "list of texts"),
        ({**request["body"], "max_tokens_per_doc": 4}, "below the 64 tokens"),
        ({**request["body"], "return_documents": True}, "unknown field(s) return_documents"),
        ({**request["body"], "model": "other"}, "not served here"),
    ]:
        answer = httpx.post(reranker.url + "/v2/rerank", json=body, timeout=60)
        assert answer.status_code in (404, 422) and says in answer.json()["error"], (body, answer.text)
    long_document = {**request["body"], "documents": ["w1 " * 200], "max_tokens_per_doc": 4096}
    assert httpx.post(reranker.url + "/v2/rerank", json=long_document, timeout=60).status_code == 200  # cut, as Cohere


def test_infinitys_client_lists_the_model_and_classifies_with_its_default_name(classifier):
    models = _send(classifier, _recorded("/models"))
    assert models.status_code == 200
    (entry,) = models.json()["data"]
    # what infinity_client's ModelInfo.from_dict requires: an id, stats, and owned_by "infinity"
    assert entry["id"] == Path(entry["id"]).name and entry["owned_by"] == "infinity" and "stats" in entry
    answer = _send(classifier, _recorded("/classify"))  # model="default/not-specified"
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 2


def test_the_model_id_is_a_name_never_a_path(classifier, saved_classifier, tmp_path):
    info = httpx.get(classifier.url + "/info", timeout=10).json()
    assert info["model_id"] == Path(saved_classifier).name and "/" not in info["model_id"]
    (listed,) = httpx.get(classifier.url + "/v1/models", timeout=10).json()["data"]
    assert listed["id"] == info["model_id"]
    assert served_model_name(saved_classifier, "my-model") == "my-model"
    assert served_model_name("org/hub-model") == "org/hub-model"  # a Hub id, not a path on this machine
    with pytest.raises(ValueError, match="non-empty text"):
        served_model_name(saved_classifier, " ")


def test_eek_serve_refuses_a_blank_served_model_name(saved_classifier, capsys):
    from earlyexit_kernels.integrations.cli import main

    assert main(["serve", saved_classifier, "--served-model-name", ""]) == 2
    assert "--served-model-name" in capsys.readouterr().err


def test_the_real_clients_where_installed(reranker, classifier):
    cohere = pytest.importorskip("cohere", reason="cohere's SDK is not installed (optional)")
    response = cohere.ClientV2(api_key="k", base_url=reranker.url).rerank(
        model="tiny-reranker", query="what is w1", documents=["w1 w2", "w3 w4"], top_n=1
    )
    assert len(response.results) == 1
    infinity = pytest.importorskip("infinity_client", reason="infinity_client is not installed (optional)")
    from infinity_client.api.default import classify, models
    from infinity_client.models import ClassifyInput

    client = infinity.Client(base_url=classifier.url)
    assert models.sync_detailed(client=client).status_code == 200
    assert classify.sync_detailed(client=client, body=ClassifyInput(input_=["w1 w2"])).status_code == 200
