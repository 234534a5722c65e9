"""An MPNet classifier saved with its tokenizer goes through every way in: eek.classify, the command
line and the HTTP server (a real uvicorn server on 127.0.0.1) answer alike, exits spread over layers."""

import threading
import time

import pytest
import torch
from conftest import WORDS, word_texts
from transformers import MPNetConfig, MPNetForSequenceClassification, MPNetTokenizerFast

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main
from earlyexit_kernels.integrations.model_folder import load_model
from earlyexit_kernels.methods.exit_rules import entropy

pd = pytest.importorskip("pandas", reason="the command line writes its tables through pandas")


@pytest.fixture(scope="module")
def saved_mpnet(tmp_path_factory):
    """A patched tiny MPNet (Entropy between two of layer 1's entropies) and its tokenizer, saved."""
    path = tmp_path_factory.mktemp("mpnet")
    special = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
    (path / "vocab.txt").write_text("\n".join([*special, *WORDS]) + "\n")
    tokenizer = MPNetTokenizerFast(vocab=str(path / "vocab.txt"))
    torch.manual_seed(0)
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    config = MPNetConfig(
        vocab_size=len(special) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=72,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MPNetForSequenceClassification._from_config(config).eval()
    eek.patch(model, eek.Entropy(0.0))
    with torch.no_grad():
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn_like(head.weight) * 3)
        values = sorted(
            float(entropy(model(**tokenizer(t, return_tensors="pt"), return_all_exits=True).all_logits[0].float()))
            for t in word_texts(200, seed=1)
        )
    middle = len(values) // 2
    eek.patch(model, eek.Entropy((values[middle - 1] + values[middle]) / 2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_command_line_and_the_server_answer_as_eek_classify(saved_mpnet, tmp_path):
    pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'earlyexit_kernels[serve]')")
    httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    import uvicorn

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
    assert main(["classify", str(saved_mpnet), str(source), str(target), "--no-progress"]) == 0
    out = pd.read_csv(target)
    assert list(zip(out.label, out.exit_layer)) == expected

    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, model_id="mpnet"), host="127.0.0.1", port=0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        answers = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"inputs": [[t] for t in texts]}, timeout=60
        ).json()
        assert [(a[0]["label"], a[0]["exit_layer"]) for a in answers] == expected
    finally:
        server.should_exit = True
        thread.join(60)
