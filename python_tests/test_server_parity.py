"""What clients of text-embeddings-inference and the Hugging Face Inference API expect, on real local servers.

Multi-label models answer sigmoid scores; ``/rerank`` answers in TEI's shape, best first;
``truncation_direction`` cuts either end; every answer carries timing headers; an API key
guards every route but ``/health``; a request beyond the batch limit is refused naming
it, one within it is split over the engine's batches; ``huggingface_hub.InferenceClient``
classifies against the server.
"""

import pytest
import torch
from conftest import WORDS, word_texts
from served_models import cross_encoder_folder, multi_label_folder, serving, spread

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402

KEY = "s3cret-key"
TIMING_HEADERS = ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time")


@pytest.fixture(scope="module")
def guarded_server(loaded_classifier):
    with serving(*loaded_classifier, max_batch_size=4, max_length=16, max_client_batch_size=10, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory):
    model, tokenizer = load_model(multi_label_folder(tmp_path_factory.mktemp("multi_label")))
    with serving(model, tokenizer) as running:
        yield model, tokenizer, running


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    model, tokenizer = load_model(cross_encoder_folder(tmp_path_factory.mktemp("cross_encoder")))
    with serving(model, tokenizer) as running:
        yield model, tokenizer, running


AUTH = {"authorization": f"Bearer {KEY}"}


def test_the_api_key_guards_every_route_but_health(guarded_server):
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        response = guarded_server.post("/predict", {"inputs": "w1 w2"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error_type"] == "Unauthorized"
        assert "Authorization: Bearer" in response.json()["error"]
    assert httpx.get(guarded_server.url + "/info", timeout=10).status_code == 401
    assert httpx.get(guarded_server.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(guarded_server.url + "/health", timeout=10).status_code == 200
    assert guarded_server.post("/predict", {"inputs": "w1 w2"}, headers=AUTH).status_code == 200


def test_every_answer_carries_timing_headers_in_milliseconds(guarded_server):
    response = guarded_server.post("/predict", {"inputs": [["w1 w2"], ["w3"]]}, headers=AUTH)
    assert response.status_code == 200
    times = {name: int(response.headers[name]) for name in TIMING_HEADERS}
    assert all(value >= 0 for value in times.values())
    parts = times["x-tokenization-time"] + times["x-queue-time"] + times["x-inference-time"]
    assert parts <= times["x-total-time"] + 3  # each part rounded to a millisecond


def classify_ids(model, ids_list):
    rows = [{"input_ids": torch.tensor(ids)} for ids in ids_list]
    return list(eek.classify(model, rows))


def test_truncation_direction_cuts_the_start_or_the_end(guarded_server, loaded_classifier):
    model, tokenizer = loaded_classifier
    text = " ".join(WORDS[:30])
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    kept_end = [cls, *words[-14:], sep]
    kept_start = [cls, *words[:14], sep]
    expected = classify_ids(model, [kept_start, kept_end])
    for direction, prediction in zip(("Right", "Left"), expected, strict=True):
        body = {"inputs": text, "truncate": True, "truncation_direction": direction, "raw_scores": True}
        answer = guarded_server.post("/predict", body, headers=AUTH).json()
        by_label = {entry["label"]: entry["score"] for entry in answer}
        logits = [by_label[model.config.id2label[c]] for c in range(3)]
        assert logits == pytest.approx(prediction.logits.float().tolist(), abs=1e-5)
        assert answer[0]["exit_layer"] == prediction.exit_layer
    assert expected[0].logits.tolist() != expected[1].logits.tolist(), "the two ends must differ for this to mean much"
    bad = guarded_server.post("/predict", {"inputs": text, "truncation_direction": "Middle"}, headers=AUTH)
    assert bad.status_code == 422 and '"Left" or "Right"' in bad.json()["error"]


def test_a_request_beyond_the_batch_limit_is_refused_naming_it_and_one_within_is_split(
    guarded_server, loaded_classifier
):
    model, tokenizer = loaded_classifier
    texts = [t or "w0" for t in word_texts(11, seed=12, longest=10)]
    refused = guarded_server.post("/predict", {"inputs": [[t] for t in texts]}, headers=AUTH)
    assert refused.status_code == 413
    assert "at most 10" in refused.json()["error"] and "--max-client-batch-size" in refused.json()["error"]
    answered = guarded_server.post("/predict", {"inputs": [[t] for t in texts[:9]]}, headers=AUTH)
    assert answered.status_code == 200, "9 inputs over max_batch_size=4: split over the engine's layer calls"
    for answer, prediction in zip(answered.json(), eek.classify(model, texts[:9], tokenizer=tokenizer), strict=True):
        best = int(prediction.logits.argmax())
        assert answer[0]["label"] == model.config.id2label[best]
        assert answer[0]["exit_layer"] == prediction.exit_layer


def test_multi_label_models_answer_every_labels_sigmoid(multi_label):
    model, tokenizer, server = multi_label
    texts = [t or "w0" for t in word_texts(12, seed=13)]
    answers = server.post("/predict", {"inputs": [[t] for t in texts]}).json()
    predictions = list(eek.classify(model, texts, tokenizer=tokenizer))
    assert spread([p.exit_layer for p in predictions])
    for answer, prediction in zip(answers, predictions, strict=True):
        probabilities = torch.sigmoid(prediction.logits.float())
        got = {entry["label"]: entry["score"] for entry in answer}
        assert list(got) == [
            model.config.id2label[c] for c in probabilities.argsort(descending=True, stable=True).tolist()
        ]
        for c, p in enumerate(probabilities.tolist()):
            assert got[model.config.id2label[c]] == pytest.approx(p, abs=1e-6)
        assert answer[0]["exit_layer"] == prediction.exit_layer
    assert abs(sum(e["score"] for e in answers[0]) - 1.0) > 1e-3, "independent sigmoids, not a softmax"
    assert httpx.get(server.url + "/info", timeout=10).json()["problem_type"] == "multi_label_classification"


def test_rerank_answers_in_tei_shape_best_first(reranker):
    model, tokenizer, server = reranker
    query, texts = "w5 w6", [t or "w7" for t in word_texts(16, seed=14)]
    response = server.post("/rerank", {"query": query, "texts": texts, "return_text": True})
    assert response.status_code == 200
    answer = response.json()
    assert all(name in response.headers for name in TIMING_HEADERS)
    expected = eek.rerank(model, query, texts, tokenizer=tokenizer, return_text=True)
    assert [e["index"] for e in answer] == [r.index for r in expected]
    for entry, ranked in zip(answer, expected, strict=True):
        assert entry["score"] == pytest.approx(ranked.score, abs=1e-6)
        assert (entry["text"], entry["exit_layer"], entry["layers_run"]) == (
            ranked.text,
            ranked.exit_layer,
            ranked.layers_run,
        )
    assert spread([e["exit_layer"] for e in answer])
    raw = server.post("/rerank", {"query": query, "texts": texts, "raw_scores": True}).json()
    assert "text" not in raw[0]
    assert raw[0]["score"] == pytest.approx(
        float(torch.logit(torch.tensor(answer[0]["score"], dtype=torch.float64))), abs=1e-4
    )


def test_rerank_refuses_bad_requests_and_classifiers(reranker, guarded_server):
    _, _, server = reranker
    for body, status, words in (
        ({"query": "w1", "texts": []}, 400, "empty list"),
        ({"query": "", "texts": ["w1"]}, 400, "query is an empty text"),
        ({"query": "w1", "texts": "w2"}, 422, "list of strings"),
        ({"query": "w1", "texts": ["w2"], "top_n": 3}, 422, "unknown field"),
    ):
        response = server.post("/rerank", body)
        assert response.status_code == status and words in response.json()["error"]
    loaded_classifier = guarded_server.post("/rerank", {"query": "w1", "texts": ["w2"]}, headers=AUTH)
    assert loaded_classifier.status_code == 400 and "num_labels == 1" in loaded_classifier.json()["error"]


def test_huggingface_hub_inference_client_classifies(guarded_server, loaded_classifier):
    hub = pytest.importorskip("huggingface_hub", reason="the real client comes with huggingface_hub")
    model, tokenizer = loaded_classifier
    client = hub.InferenceClient(base_url=guarded_server.url, api_key=KEY)
    text = "w3 w8 w9 w10"
    (prediction,) = eek.classify(model, [text], tokenizer=tokenizer)
    probabilities = prediction.logits.float().softmax(-1)
    elements = client.text_classification(text)
    assert [e.label for e in elements] == [
        model.config.id2label[c] for c in probabilities.argsort(descending=True, stable=True).tolist()
    ]
    assert [e.score for e in elements] == pytest.approx(sorted(probabilities.tolist(), reverse=True), abs=1e-6)
    top = client.text_classification(text, top_k=1, function_to_apply="sigmoid")
    assert len(top) == 1
    assert top[0].score == pytest.approx(float(torch.sigmoid(prediction.logits.float()).max()), abs=1e-6)
    with pytest.raises(hub.errors.HfHubHTTPError):
        hub.InferenceClient(base_url=guarded_server.url, api_key="wrong").text_classification(text)
