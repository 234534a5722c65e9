"""The server on the GPU's engine (engine="cohorts", the default on CUDA), on its CPU twin: a real
uvicorn server on 127.0.0.1 serving a model patched on the graphed step, its concurrent clients
answered as eek.classify answers each text."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import word_texts

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from served_models import serving  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine  # noqa: E402
from earlyexit_kernels.patching.state import state_of  # noqa: E402


def test_concurrent_clients_on_the_cohort_engine_get_eek_classify_s_answers(loaded_classifier):
    model, tokenizer = loaded_classifier
    eek.patch(model, state_of(model).policy, step="graphed")  # the CUDA plan's step, uncaptured on the CPU
    texts = [t or "w1" for t in word_texts(64, seed=21)]
    expected = list(eek.classify(model, texts, tokenizer=tokenizer, engine="continuous"))
    with serving(model, tokenizer, max_batch_size=16, engine="cohorts") as running:
        assert isinstance(running.app.state.eek.worker.engine, CohortEngine)

        def ask(i):
            return httpx.post(
                running.url + "/predict", json={"inputs": [[texts[i]], [texts[i + 32]]], "raw_scores": True}, timeout=60
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, range(32)))
        info = httpx.get(running.url + "/info", timeout=10).json()
    exits = set()
    for i, response in enumerate(responses):
        assert response.status_code == 200
        for answer, want in zip(response.json(), (expected[i], expected[i + 32])):
            by_label = {entry["label"]: entry for entry in answer}
            for index, name in model.config.id2label.items():
                assert by_label[name]["score"] == pytest.approx(float(want.logits[int(index)]), abs=1e-5)
            assert answer[0]["exit_layer"] == want.exit_layer
            exits.add(want.exit_layer)
    assert len(exits) > 1, "exits should spread over layers for this test to mean much"
    assert info["max_age"] is None  # cohorts launch in arrival order: no age rule to apply
