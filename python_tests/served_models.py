"""Small offline models of the kinds people serve besides single-label classifiers, and a local server.

- :func:`multi_label_folder`: a patched BERT with ``problem_type="multi_label_classification"``
  (4 labels, ``MultiLabelConfidence``, exits spread over its layers) and its tokenizer;
- :func:`cross_encoder_folder`: a patched one-output BERT cross-encoder (``ScoreBand(low)``,
  exits spread) and its tokenizer;
- :func:`mpnet_folder`: a patched three-class MPNet (``Entropy``, exits spread) and its tokenizer.

Random weights; the exit heads are perturbed and the thresholds put midway between two
of layer 1's values around their median on ``word_texts``, so that exits spread.
"""

import contextlib
import functools
import statistics
import threading
import time

import torch
from conftest import WORDS, median_gap, word_bert, word_texts

import earlyexit_kernels as eek


def _perturb_heads(model, scale: float) -> None:
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(torch.randn_like(model.bert.pooler.dense.weight) * 0.5)
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn_like(head.weight) * scale)


def multi_label_folder(path) -> str:
    labels = {0: "toxic", 1: "insult", 2: "threat", 3: "spam"}
    model, tokenizer = word_bert(
        path,
        4,
        problem_type="multi_label_classification",
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    eek.patch(model, eek.MultiLabelConfidence(1.0))
    _perturb_heads(model, 3.0)
    least = []
    with torch.no_grad():
        for text in word_texts(200, seed=1):
            out = model(**tokenizer(text, return_tensors="pt"), return_all_exits=True)
            least.append(float(out.all_logits[0, 0].abs().min()))
    margin = median_gap(least)
    eek.patch(model, eek.MultiLabelConfidence(1.0 / (1.0 + float(torch.exp(torch.tensor(-margin))))))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def cross_encoder_folder(path) -> str:
    model, tokenizer = word_bert(path, 1)
    eek.patch(model, eek.ScoreBand(low=0.0))
    _perturb_heads(model, 1.0)
    scores = []
    with torch.no_grad():
        texts = word_texts(200, seed=2)
        for query, text in zip(texts, reversed(texts), strict=True):
            out = model(**tokenizer(query or "w1", text or "w2", return_tensors="pt"), return_all_exits=True)
            scores.append(float(out.all_logits[0, 0, 0]))
    eek.patch(model, eek.ScoreBand(low=median_gap(scores)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def mpnet_folder(path) -> str:
    from transformers import MPNetConfig, MPNetForSequenceClassification, MPNetTokenizerFast

    from earlyexit_kernels.methods.exit_rules import entropy

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
        entropies = [
            float(entropy(model(**tokenizer(t, return_tensors="pt"), return_all_exits=True).all_logits[0].float()))
            for t in word_texts(200, seed=1)
        ]
    eek.patch(model, eek.Entropy(median_gap(entropies)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def spread(values) -> bool:
    """More than one distinct value (exits that spread over layers)."""
    return len(set(values)) > 1 and statistics.pstdev(values) > 0


@contextlib.contextmanager
def serving(model, tokenizer, server=None, **options):
    """A real server (``server``: a ``RunningServer`` subclass, by default that class) for ``create_app(model, tokenizer, **options)``."""
    from earlyexit_kernels.integrations.server import create_app

    running = (server or RunningServer)(create_app(model, tokenizer, **options))
    try:
        yield running
    finally:
        running.close()


class RunningServer:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, on a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @functools.cached_property
    def http(self):
        """An HTTP client of this server (``base_url`` its URL), shared by the test's requests and threads: a client
        per request loads the CA certificates each time (26 ms), longer than most requests to 127.0.0.1 take."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=60)

    def post(self, route: str, body, headers=None, timeout=60):
        return self.http.post(route, json=body, headers=headers, timeout=timeout)

    def close(self):
        if "http" in self.__dict__:
            self.http.close()
        self.server.should_exit = True
        self.thread.join(60)
