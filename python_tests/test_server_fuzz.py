"""Every route of the server fuzzed against its own OpenAPI document, on real local servers.

schemathesis reads ``GET /openapi.json`` and, for each operation, sends requests drawn by
Hypothesis: bodies, and ``X-Request-Id`` headers, that fit the document and bodies that break
it (wrong types, missing or unknown fields, empty lists and texts, boundary values). Every
answer must come without a 5xx, with a status code the document lists, and match the
document's schema for it (headers included); a request that breaks the schema must be refused
with a 4xx, and one that fits it accepted (or refused only for what the document cannot state:
a text over the model's tokens, 413); and every 4xx must be a JSON ``{"error": "...",
"error_type": "..."}``. Every route on two servers: a three-label classifier (whose ``/rerank``
refuses every body, as its document says) and a one-output cross-encoder (where TEI's and
Cohere's rerank shapes are answered).
"""

import time
from collections import Counter

import pytest
from served_models import RunningServer, cross_encoder_folder

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
schemathesis = pytest.importorskip(
    "schemathesis", reason="the fuzzer is schemathesis, a test dependency (scripts/setup_env.sh installs it)"
)
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from earlyexit_kernels._version import __version__  # noqa: E402
from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.openapi import openapi_document  # noqa: E402

EXAMPLES = 60  # per operation and server, besides schemathesis' boundary cases: 2776 requests, 18-33 s on 2 cores
SENT = Counter()  # requests sent per operation, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report_what_was_sent():
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    lines = [f"  {count:5d}  {operation}" for operation, count in sorted(SENT.items())]
    print(f"\nfuzzed: {sum(SENT.values())} requests in {seconds:.0f} s\n" + "\n".join(lines))


def _server(model_dir, model_id):
    model, tokenizer = load_model(model_dir)
    return RunningServer(create_app(model, tokenizer, model_id=model_id, max_batch_size=16))


LABELS = {False: ["neg", "neutral", "pos"], True: ["LABEL_0"]}  # the classifier's, the cross-encoder's


def _document(model_id, reranks, max_length=64):  # the saved classifiers' positions
    return openapi_document(
        model_id, version=__version__, api_key=False, reranks=reranks, max_length=max_length, labels=LABELS[reranks]
    )


# A text longer than the model takes gets 413 (without "truncate"): a token count that JSON
# Schema cannot state, so a request the document allows may get it too.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "413", "429"]}}}
)


@pytest.fixture(scope="module")
def classifier_url(saved_classifier):
    server = _server(saved_classifier, "tiny-classifier")
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def reranker_url(tmp_path_factory):
    server = _server(cross_encoder_folder(tmp_path_factory.mktemp("cross_encoder")), "tiny-reranker")
    yield server.url
    server.close()


def test_the_fuzzed_documents_are_the_ones_the_servers_serve(classifier_url, reranker_url):
    import httpx

    for url, model_id, reranks in ((classifier_url, "tiny-classifier", False), (reranker_url, "tiny-reranker", True)):
        assert httpx.get(url + "/openapi.json", timeout=10).json() == _document(model_id, reranks)


def errors_are_json(ctx, response, case):
    """Every 4xx is a JSON object with a non-empty "error" and an "error_type"."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict), f"a {response.status_code} answered {response.text[:200]!r}, not a JSON object"
        assert isinstance(body.get("error"), str) and body["error"], f"a {response.status_code} without an error"
        assert isinstance(body.get("error_type"), str), f"a {response.status_code} without an error_type"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


def _send(case, url, server, excluded=()):
    SENT[f"{server}: {case.operation.label}"] += 1
    case.call_and_validate(base_url=url, additional_checks=[errors_are_json], excluded_checks=excluded, timeout=60)


# The documents are built here, at collection, as the servers build theirs (the test above holds
# them equal): schemathesis' fixture-based loading does not run under this pytest.
classifier = schemathesis.openapi.from_dict(_document("tiny-classifier", False), config=CONFIG)
reranker = schemathesis.openapi.from_dict(_document("tiny-reranker", True), config=CONFIG)


@classifier.parametrize()
@FUZZ
def test_every_route_of_a_classifier_holds_to_its_document(case, classifier_url):
    # A classifier's /rerank refuses every body, well-formed or not (its document says so).
    excluded = [positive_data_acceptance] if "rerank" in case.operation.path else []
    _send(case, classifier_url, "classifier", excluded)


@reranker.parametrize()
@FUZZ
def test_every_route_of_a_cross_encoder_holds_to_its_document(case, reranker_url):
    _send(case, reranker_url, "cross-encoder")
