"""The routes clients of Infinity, vLLM, Cohere and OpenAI already call, on real local servers.

``/classify`` and ``/v1/classify`` answer in Infinity's shape with ``/predict``'s scores;
``/rerank`` and ``/v1/rerank`` take Cohere's shape beside TEI's and rank as TEI's does;
``/v1/models`` names the served model, and a request naming another gets 404 saying which is
served; every answer carries the request id; ``/openapi.json`` documents exactly the routes
there are, ``/docs`` is Swagger UI over them from this server's own files, ``eek serve --help`` lists them.

Each shape is checked against an example recorded from the server or the reference it comes
from (``RECORDED_*`` below): every field a client of that server reads is there, with the
same JSON type.
"""

import re

import pytest
from conftest import word_texts
from served_models import RunningServer, cross_encoder_folder, spread

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.openapi import ROUTES  # noqa: E402

# Infinity's POST /classify answer: the shape of its pydantic model ClassifyResult
# (michaelfeil/infinity, libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py: object
# "classify", data a list per input of {score, label}, model, usage {prompt_tokens, total_tokens},
# id "infinity-<uuid4>", created); label names and numbers as a go_emotions model answers.
RECORDED_INFINITY_CLASSIFY = {
    "object": "classify",
    "data": [[{"score": 0.9624, "label": "love"}, {"score": 0.0187, "label": "admiration"}]],
    "model": "SamLowe/roberta-base-go_emotions",
    "usage": {"prompt_tokens": 7, "total_tokens": 7},
    "id": "infinity-5b0c1a2e-7a1c-4a5e-9a59-3f0d8c6a9b21",
    "created": 1722500000,
}
# Infinity's request (its ClassifyInput: input, model, raw_scores) and vLLM's (its /classify
# docs: model and input, one text or a list; the SGLang copy of vLLM 0.7's API shows the same).
RECORDED_INFINITY_CLASSIFY_REQUEST = {"input": ["I love this"], "model": "MODEL", "raw_scores": False}
RECORDED_VLLM_CLASSIFY_REQUEST = {"model": "MODEL", "input": "Loved the new café in town"}
# Cohere's POST /v1/rerank request and answer, from Cohere's v1 API reference (documents as
# texts or {"text"} objects; the answer's meta also holds billed_units, which is Cohere's billing).
RECORDED_COHERE_RERANK_REQUEST = {
    "model": "MODEL",
    "query": "What is the capital of the United States?",
    "documents": ["Carson City is the capital city of the American state of Nevada.", {"text": "Washington, D.C."}],
    "top_n": 2,
    "return_documents": True,
}
RECORDED_COHERE_RERANK = {
    "id": "07734bd2-2473-4f07-94e1-0d9f0e6843cf",
    "results": [
        {"index": 1, "relevance_score": 0.999071, "document": {"text": "Washington, D.C."}},
        {"index": 0, "relevance_score": 0.0000262, "document": {"text": "Carson City is the capital city of ..."}},
    ],
    "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
}
NOT_PRODUCED = {"meta.billed_units"}  # Cohere's billing: nothing to bill here
# OpenAI's GET /v1/models answer (its API reference; vLLM and Infinity answer the same fields and more).
RECORDED_OPENAI_MODELS = {
    "object": "list",
    "data": [{"id": "model-id-0", "object": "model", "created": 1686935002, "owned_by": "organization-owner"}],
}


def assert_same_shape(ours, recorded, where=""):
    """Every field of ``recorded`` is in ``ours`` with the same JSON type (lists: item by item, as far as
    both go); fields only ``ours`` has (``exit_layer``, ``layers_run``, ...) are allowed."""
    if isinstance(recorded, dict):
        assert isinstance(ours, dict), f"{where or 'the answer'} should be an object"
        for key, value in recorded.items():
            path = f"{where}.{key}" if where else key
            if path in NOT_PRODUCED:
                continue
            assert key in ours, f"{path} is missing"
            assert_same_shape(ours[key], value, path)
    elif isinstance(recorded, list):
        assert isinstance(ours, list) and ours, f"{where} should be a non-empty list"
        for mine, theirs in zip(ours, recorded):
            assert_same_shape(mine, theirs, f"{where}[]")
    elif isinstance(recorded, bool | str):
        assert type(ours) is type(recorded), f"{where}: {ours!r} is not a {type(recorded).__name__}"
    else:  # numbers: an integer where they have one, any number where they have a float
        kinds = int if isinstance(recorded, int) else (int, float)
        assert isinstance(ours, kinds) and not isinstance(ours, bool), f"{where}: {ours!r} is not a number"


@pytest.fixture(scope="module")
def classifier(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    # the model id as `eek serve` makes it: MODEL as given on the command line
    running = RunningServer(create_app(model, tokenizer, model_id=saved_classifier, max_batch_size=8))
    yield model, tokenizer, running
    running.close()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    folder = cross_encoder_folder(tmp_path_factory.mktemp("cross_encoder"))
    model, tokenizer = load_model(folder)
    running = RunningServer(create_app(model, tokenizer, model_id=folder))
    yield model, tokenizer, running
    running.close()


def folder_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def test_classify_answers_in_infinitys_shape_with_the_scores_of_predict(classifier, saved_classifier):
    model, tokenizer, server = classifier
    texts = [t or "w1" for t in word_texts(12, seed=21)]
    request = {**RECORDED_INFINITY_CLASSIFY_REQUEST, "model": folder_name(saved_classifier), "input": texts}

    for route in ("/classify", "/v1/classify"):
        response = server.post(route, request, headers={"x-request-id": f"trace-{route}"})

        assert response.status_code == 200
        answer = response.json()
        assert_same_shape(answer, RECORDED_INFINITY_CLASSIFY)
        assert answer["object"] == "classify" and answer["model"] == saved_classifier
        assert answer["id"] == response.headers["x-request-id"] == f"trace-{route}"
        tokens = sum(len(tokenizer(text)["input_ids"]) for text in texts)
        assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        predicted = server.post("/predict", {"inputs": [[text] for text in texts]}).json()
        assert answer["data"] == predicted, "each input: every label with /predict's score, best first"
    assert spread([labels[0]["exit_layer"] for labels in answer["data"]])


def test_classify_takes_vllms_request_one_text_and_raw_scores(classifier, saved_classifier):
    model, tokenizer, server = classifier
    text = RECORDED_VLLM_CLASSIFY_REQUEST["input"]
    answer = server.post("/v1/classify", {**RECORDED_VLLM_CLASSIFY_REQUEST, "model": saved_classifier}).json()
    assert len(answer["data"]) == 1
    assert answer["data"][0] == server.post("/predict", {"inputs": text}).json()

    raw = server.post("/classify", {"input": [text], "raw_scores": True}).json()  # model left out
    logits = next(iter(eek.classify(model, [text], tokenizer=tokenizer))).logits.float()
    by_label = {entry["label"]: entry["score"] for entry in raw["data"][0]}
    assert [by_label[model.config.id2label[c]] for c in range(3)] == pytest.approx(logits.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "body, status, says",
    [
        ('{"input": ', 400, "not valid JSON"),
        ({"input": []}, 400, "input is an empty list"),
        ({"input": ["w1", ""]}, 400, "input 1 is an empty text"),
        ({"input": ""}, 400, "input 0 is an empty text"),
        ({"inputs": ["w1"]}, 422, '"input"'),
        ({"input": [["w1", "w2"]]}, 422, "a text or a list of texts"),
        ({"input": ["w1"], "top_k": 1}, 422, "unknown field(s) top_k"),
        ({"input": ["w1"], "raw_scores": "yes"}, 422, "raw_scores must be true or false"),
        ({"input": ["w1"], "model": 7}, 422, "model must be a string"),
        ({"input": ["w1"], "model": "bert-base-uncased"}, 404, "this server serves"),
        ('{"input": ["w1 \\ud800"]}', 400, "lone UTF-16 surrogate"),
        ({"input": [" ".join(["w1"] * 80)]}, 413, 'send "truncate": true'),
    ],
)
def test_a_bad_classify_request_gets_a_4xx_saying_what_to_change(classifier, body, status, says):
    _, _, server = classifier
    if isinstance(body, str):
        response = httpx.post(server.url + "/classify", content=body, timeout=60)
    else:
        response = server.post("/classify", body)

    assert response.status_code == status
    assert says in response.json()["error"]
    assert server.post("/classify", {"input": ["w1"]}).status_code == 200


def test_a_request_naming_another_model_gets_404_naming_the_served_one(classifier, reranker, saved_classifier):
    _, _, server = classifier
    refused = server.post("/v1/classify", {"model": "intfloat/e5-large", "input": ["w1"]})
    assert refused.status_code == 404 and refused.json()["error_type"] == "NotFound"
    assert saved_classifier in refused.json()["error"] and "/v1/models" in refused.json()["error"]

    _, _, rerank_server = reranker
    cohere = rerank_server.post("/v1/rerank", {**RECORDED_COHERE_RERANK_REQUEST, "model": "rerank-english-v3.0"})
    assert cohere.status_code == 404 and "this server serves" in cohere.json()["error"]


def test_v1_models_names_the_served_model_as_openai_does(classifier, saved_classifier):
    _, _, server = classifier
    answer = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert_same_shape(answer, RECORDED_OPENAI_MODELS)
    assert [entry["id"] for entry in answer["data"]] == [saved_classifier]
    assert httpx.get(server.url + "/info", timeout=10).json()["model_id"] == saved_classifier


def test_rerank_takes_cohere_shape_and_ranks_as_the_tei_shape_does(reranker):
    model, tokenizer, server = reranker
    query, texts = "w5 w6", [t or "w7" for t in word_texts(16, seed=22)]
    documents = [text if i % 2 else {"text": text, "source": f"doc-{i}"} for i, text in enumerate(texts)]
    tei = server.post("/rerank", {"query": query, "texts": texts}).json()

    for route in ("/rerank", "/v1/rerank"):
        response = server.post(route, {"query": query, "documents": documents, "return_documents": True})

        assert response.status_code == 200
        answer = response.json()
        assert_same_shape(answer, RECORDED_COHERE_RERANK)
        assert answer["id"] == response.headers["x-request-id"]
        assert [r["index"] for r in answer["results"]] == [entry["index"] for entry in tei]
        assert [r["relevance_score"] for r in answer["results"]] == [entry["score"] for entry in tei]
        assert [r["exit_layer"] for r in answer["results"]] == [entry["exit_layer"] for entry in tei]
        for result in answer["results"]:
            sent = documents[result["index"]]
            assert result["document"] == (sent if isinstance(sent, dict) else {"text": sent})
        tokens = sum(len(tokenizer(query, text)["input_ids"]) for text in texts)
        assert answer["usage"]["prompt_tokens"] == tokens
    assert spread([entry["exit_layer"] for entry in tei])

    top = server.post("/rerank", {**RECORDED_COHERE_RERANK_REQUEST, "model": None}).json()
    assert len(top["results"]) == 2
    best = server.post("/rerank", {"query": query, "documents": texts, "top_n": 3, "raw_scores": True}).json()
    whole = server.post("/rerank", {"query": query, "documents": texts, "top_n": 3.0, "raw_scores": True}).json()
    assert whole["results"] == best["results"], "3.0 is an integer to JSON Schema"
    assert [r["index"] for r in best["results"]] == [entry["index"] for entry in tei[:3]]
    assert "document" not in best["results"][0]
    expected = eek.rerank(model, query, texts, tokenizer=tokenizer, raw_scores=True, top_n=3)
    assert [r["relevance_score"] for r in best["results"]] == pytest.approx([r.score for r in expected], abs=1e-5)


def test_v1_rerank_keeps_teis_shape_and_refusals(reranker, classifier):
    _, _, server = reranker
    texts = ["w1 w2", "w3"]
    assert server.post("/v1/rerank", {"query": "w4", "texts": texts}).json() == (
        server.post("/rerank", {"query": "w4", "texts": texts}).json()
    )
    for body, status, says in (
        ({"query": "w1", "documents": []}, 400, "documents is an empty list"),
        ({"query": "w1", "documents": [""]}, 400, "documents[0] is an empty text"),
        ({"query": "", "documents": ["w2"]}, 400, "query is an empty text"),
        ({"documents": ["w2"]}, 422, "query must be a text"),
        ({"query": "w1", "documents": [{"title": "w2"}]}, 422, "documents[0] must be a text"),
        ({"query": "w1", "documents": ["w2"], "top_n": 0}, 422, "top_n must be an integer >= 1"),
        ({"query": "w1", "documents": ["w2"], "rank_fields": ["title"]}, 422, "unknown field(s) rank_fields"),
        ({"query": "w1", "texts": ["w2"], "top_n": 3}, 422, "unknown field"),  # TEI's shape has no top_n
    ):
        response = server.post("/v1/rerank", body)
        assert (response.status_code, says in response.json()["error"]) == (status, True), body
    _, _, classifier_server = classifier
    refused = classifier_server.post("/v1/rerank", {"query": "w1", "documents": ["w2"]})
    assert refused.status_code == 400 and "num_labels == 1" in refused.json()["error"]


def test_every_answer_carries_the_request_id_the_client_sent_or_a_new_one(classifier):
    _, _, server = classifier
    calls = [
        lambda headers: httpx.post(server.url + "/predict", json={"inputs": "w1"}, headers=headers, timeout=60),
        lambda headers: httpx.post(server.url + "/predict", json={"inputs": []}, headers=headers, timeout=60),
        lambda headers: httpx.get(server.url + "/health", headers=headers, timeout=10),
        lambda headers: httpx.get(server.url + "/metrics", headers=headers, timeout=10),
        lambda headers: httpx.get(server.url + "/no-such-route", headers=headers, timeout=10),
    ]
    for call in calls:
        assert call({"X-Request-Id": "client-7f3a/retry=2"}).headers["x-request-id"] == "client-7f3a/retry=2"
        fresh = {call(headers).headers["x-request-id"] for headers in ({}, {}, {"X-Request-Id": "has space"})}
        assert len(fresh) == 3 and all(re.fullmatch("[0-9a-f]{32}", value) for value in fresh)
    too_long = "x" * 129
    assert calls[0]({"X-Request-Id": too_long}).headers["x-request-id"] != too_long
    assert calls[0]({"X-Request-Id": "x" * 128}).headers["x-request-id"] == "x" * 128


def test_unknown_routes_and_methods_get_json_errors(classifier):
    _, _, server = classifier
    missing = httpx.post(server.url + "/v1/embeddings", json={"input": "w1"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"
    assert "POST /classify" in missing.json()["error"]
    wrong = httpx.get(server.url + "/classify", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error_type"] == "MethodNotAllowed"
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"].endswith("; send POST")  # the method named, not cut off after "send"
    unknown = httpx.post(server.url + "/predict", json={"inputs": "w1", "max_len": 3}, timeout=10).json()["error"]
    assert "truncation_direction" in unknown  # every field /predict takes is named


def test_the_openapi_document_describes_exactly_the_routes_there_are(classifier):
    _, _, server = classifier
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    served = {(method, route.path) for route in server.app.routes for method in route.methods - {"HEAD"}}
    assert documented == served == {(method, path) for method, path, _ in ROUTES}
    assert "securitySchemes" not in document.get("components", {}), "this server has no API key"
    rerank = document["paths"]["/rerank"]["post"]
    assert set(rerank["responses"]) == {"400"} and "more than one output" in rerank["description"]


def test_the_docs_page_is_swagger_ui_over_the_document_from_this_server_alone(classifier):
    """Swagger UI (swagger-ui-py's files, served here) with "Try it out" on /openapi.json; nothing fetched
    from elsewhere, so it works offline."""
    pytest.importorskip("swagger_ui", reason="/docs's files come from swagger-ui-py (the serve extra)")
    from earlyexit_kernels.integrations.server.docs_ui import ASSETS, assets_folder

    _, _, server = classifier
    page = httpx.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle({url: 'openapi.json'" in page.text and "tryItOutEnabled: true" in page.text
    loaded = re.findall(r"(?:src|href)='([^']+)'", page.text)
    assert loaded and all(link.startswith("docs/") for link in loaded)  # this server's files only
    assert {link.removeprefix("docs/") for link in loaded} == set(ASSETS)
    for name, media in ASSETS.items():
        asset = httpx.get(server.url + "/docs/" + name, timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media), name
        assert asset.content == (assets_folder() / name).read_bytes()
    missing = httpx.get(server.url + "/docs/index.html", timeout=10)
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"


def test_without_swagger_ui_the_docs_page_says_how_to_install_it():
    """In a process where the package cannot be imported (its entry in sys.modules set to None)."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['swagger_ui'] = None\n"
        "from earlyexit_kernels.integrations.server.docs_ui import assets_folder, docs_page\n"
        "assert assets_folder() is None\n"
        "print(docs_page('the server'))"
    )
    page = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pip install swagger-ui-py" in page and "openapi.json" in page and "<script" not in page


def test_the_bundled_swagger_ui_reads_the_document_s_openapi_version():
    """Swagger UI 4 (swagger-ui-bundle's) shows "no valid version field" for OpenAPI 3.1: the served UI must read it."""
    from earlyexit_kernels.integrations.server.docs_ui import bundled_version, reads_openapi
    from earlyexit_kernels.integrations.server.openapi import openapi_document

    assert reads_openapi("5.24.2", "3.1.0") and reads_openapi("4.15.5", "3.0.3")
    assert not reads_openapi("4.15.5", "3.1.0") and not reads_openapi("5.0.0", "2.0")
    pytest.importorskip("swagger_ui", reason="/docs's files come from swagger-ui-py (the serve extra)")
    version = bundled_version()
    assert version is not None, "the bundle's PACKAGE_VERSION was not found: read the version another way"
    document = openapi_document("m", version="0", api_key=False, reranks=False)
    assert reads_openapi(version, document["openapi"]), (
        f"Swagger UI {version} cannot render OpenAPI {document['openapi']}"
    )


def test_an_api_key_guards_the_new_routes_and_the_document_says_so(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    server = RunningServer(create_app(model, tokenizer, api_key="k3y"))
    try:
        for route in ("/v1/models", "/openapi.json", "/docs"):
            assert httpx.get(server.url + route, timeout=10).status_code == 401
        assert httpx.get(server.url + "/docs/swagger-ui.css", timeout=10).status_code in (200, 404)  # public files
        assert server.post("/v1/classify", {"input": ["w1"]}).status_code == 401
        document = httpx.get(server.url + "/openapi.json", headers={"authorization": "Bearer k3y"}, timeout=10).json()
        assert document["security"] == [{"bearer": []}]
        assert document["paths"]["/health"]["get"]["security"] == []
        assert "401" in document["paths"]["/v1/classify"]["post"]["responses"]
    finally:
        server.close()


def test_eek_serve_help_lists_every_route(capsys):
    from earlyexit_kernels.integrations.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for method, path, _ in ROUTES:
        assert f"{method} {path}" in shown


def test_the_api_reference_lists_every_route():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for method, path, _ in ROUTES:
        assert f"`{method} {path}`" in table, f"docs/api.md's route table lacks {method} {path}"


POST_ROUTES = [path for method, path, _ in ROUTES if method == "POST"]


@pytest.mark.parametrize(
    "body, says",
    [
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),  # Python's JSON reader recurses per level
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_every_post_route_answers_an_unreadable_body_with_400(classifier, reranker, body, says):
    for route in POST_ROUTES:
        _, _, server = reranker if "rerank" in route else classifier  # a classifier's /rerank reads no body
        response = httpx.post(server.url + route, content=body, timeout=60)
        assert (response.status_code, response.json()["error_type"]) == (400, "Validation"), route
        assert says in response.json()["error"], route


def test_a_lone_surrogate_in_any_text_gets_400_not_a_tokenizer_crash(classifier, reranker):
    _, _, server = classifier
    _, _, rerank_server = reranker
    text = '"w1 \\udc00"'  # JSON's escape of half a UTF-16 pair: no Unicode character
    for target, route, body in (
        (server, "/predict", '{"inputs": %s}'),
        (server, "/", '{"inputs": [%s]}'),
        (server, "/v1/classify", '{"input": %s}'),
        (rerank_server, "/rerank", '{"query": "w1", "texts": [%s]}'),
        (rerank_server, "/v1/rerank", '{"query": %s, "documents": ["w2"]}'),
    ):
        response = httpx.post(target.url + route, content=body % text, timeout=60)
        assert response.status_code == 400 and "lone UTF-16 surrogate" in response.json()["error"], route


def test_the_inference_api_takes_parameters_as_an_object_or_null_only(classifier):
    _, _, server = classifier
    assert server.post("/", {"inputs": "w1", "parameters": None}).status_code == 200
    for parameters in (0, [], "top_k=1"):
        refused = server.post("/", {"inputs": "w1", "parameters": parameters})
        assert refused.status_code == 422 and "parameters must be a JSON object" in refused.json()["error"]


def test_info_says_which_guarantee_the_served_threshold_holds(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    fields = {"risk": "rows lost", "budget": 0.01, "confidence": 0.95, "guarantee": "expected", "rows": 900}
    server = RunningServer(create_app(model, tokenizer, certificate={**fields, "certified": True}))
    try:
        held = httpx.get(server.url + "/info", timeout=10).json()["certificate"]
    finally:
        server.close()
    assert held["guarantee"] == "expected" and held["confidence"] is None and held["budget"] == 0.01
    assert "on average" in held["promise"]
    server = RunningServer(create_app(model, tokenizer))
    try:
        assert httpx.get(server.url + "/info", timeout=10).json()["certificate"] is None  # nothing certified
    finally:
        server.close()
