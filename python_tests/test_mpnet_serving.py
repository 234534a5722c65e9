"""An MPNet classifier saved with its tokenizer goes through every way in: eek.classify, the command
line and the HTTP server (a real uvicorn server on 127.0.0.1) answer alike, exits spread over layers."""

import pytest
from conftest import word_texts
from served_models import RunningServer, mpnet_folder

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main
from earlyexit_kernels.integrations.model_folder import load_model

pd = pytest.importorskip("pandas", reason="the command line writes its tables through pandas")


@pytest.fixture(scope="module")
def saved_mpnet(tmp_path_factory):
    return mpnet_folder(tmp_path_factory.mktemp("mpnet"))


def test_the_command_line_and_the_server_answer_as_eek_classify(saved_mpnet, tmp_path):
    pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
    pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from earlyexit_kernels.integrations.server import create_app

    model, tokenizer = load_model(saved_mpnet)
    assert type(model).__name__ == "MPNetForSequenceClassification"
    texts = word_texts(60, seed=3)
    expected = [
        (model.config.id2label[int(p.logits.argmax())], p.exit_layer)
        for p in eek.classify(model, texts, tokenizer=tokenizer)
    ]
    assert len({layer for _, layer in expected}) >= 2, "the test needs exits spread over layers"

    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"text": texts}).to_csv(source, index=False)
    assert main(["classify", saved_mpnet, str(source), str(target), "--no-progress"]) == 0
    out = pd.read_csv(target)
    assert list(zip(out.label, out.exit_layer)) == expected

    server = RunningServer(create_app(model, tokenizer, model_id="mpnet"))
    try:
        answers = server.post("/predict", {"inputs": [[t] for t in texts]}).json()
        assert [(a[0]["label"], a[0]["exit_layer"]) for a in answers] == expected
    finally:
        server.close()
