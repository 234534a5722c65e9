"""The smaller-model peer: its mean-pooled head reads no padding, and its section sets each peer beside
early exit's curve at the same number of layers (from the real-task CSV)."""

import json

import torch
from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel

from benchmarks.suite import cut_model_peer, real_task_quality


def test_the_mean_pooled_head_never_reads_padding():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = cut_model_peer.MeanPooledClassifier(BertModel(config, add_pooling_layer=False), 2).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 7, 9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[1, 4:] = 41  # different tokens in the padding of row 1
    with torch.no_grad():
        a = model(ids, mask).logits
        b = model(other, mask).logits
        alone = model(ids[:1, :4], mask[:1, :4]).logits
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0], alone[0], rtol=1e-5, atol=1e-6)
    out = model(ids, mask, labels=torch.tensor([0, 1]))
    assert out.loss.shape == () and out.logits.shape == (2, 2)


def test_the_mean_pooled_head_runs_an_encoder_without_token_types():
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = cut_model_peer.MeanPooledClassifier(MPNetModel(config, add_pooling_layer=False), 3).eval()
    ids = torch.tensor([[0, 7, 9, 2, 1], [0, 8, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        logits = model(ids, mask).logits
        alone = model(ids[1:, :3], mask[1:, :3]).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1], alone[0], rtol=1e-5, atol=1e-6)


def test_the_section_sets_each_peer_beside_the_curves_at_k_layers(tmp_path):
    rows = []
    for run, curve in (("heads (mean, mlp)", [(1.5, 0.70), (2.0, 0.80), (3.0, 0.82)]), ("pabee", [(3.5, 0.81)])):
        common = {"run": run, "method": "heads", "pooling": "mean", "head": "mlp"}
        rows += [{**common, "kind": "curve", "accuracy": a, "mean_layers": m} for m, a in curve]
        rows += [
            {**common, "kind": "static", "layer": k, "accuracy": 0.5 + 0.05 * k, "mean_layers": k} for k in (1, 2, 3)
        ]
        rows.append(
            {
                **common,
                "kind": "operating",
                "accuracy": 0.8,
                "mean_layers": 2.0,
                "full_accuracy": 0.83,
                "saved_fraction": 1 - 2.0 / 4,
                "speedup": 1.5,
                "ideal": 2.0,
                "train_rows": 10,
                "fit_seconds": 1,
                "full_depth_max_diff": 0.0,
                "static_accuracy": 0.6,
                "policy": "Entropy(0.3)",
                "stages": "",
                "warnings": "",
                "why": "",
            }
        )
    csv_path = tmp_path / "real.csv"
    real_task_quality.write_csv(rows, str(csv_path), ["--runs", "x"])
    peers = [
        {
            "layers": k,
            "head": h,
            "test_accuracy": acc,
            "validation_accuracy": acc,
            "train_rows": 100,
            "fine_tune_seconds": 10.0 * k,
        }
        for k, h, acc in ((1, "model", 0.60), (1, "mean", 0.72), (2, "model", 0.68), (2, "mean", 0.76))
    ]
    json_path = tmp_path / "peers.json"
    json_path.write_text(json.dumps({"runs": ["python -m ... run"], "recipe": {}, "peers": peers}))
    readme = tmp_path / "benchmarks.md"
    readme.write_text("# Benchmarks\n")
    cut_model_peer.update_readme(str(readme), str(json_path), str(csv_path))
    text = readme.read_text()
    assert "| 1 | 60.00% | 72.00% | 55.00% | – | – |" in text
    assert "| 2 | 68.00% | 76.00% | 60.00% | 80.00% | – |" in text
    assert "The full 3-layer model scores 83.00%." in text
    assert "- heads (mean, mlp): k = 1 (no threshold runs that few layers; the peer 72.00%)\n" in text
    assert "- pabee: k = 1 (no threshold runs that few layers; the peer 72.00%); k = 2 (" in text
    assert "static cut (heads (mean, mlp), exit head k)" in text
    cut_model_peer.update_readme(str(readme), str(json_path), str(csv_path))
    assert readme.read_text() == text, "regenerating replaces the section, never appends a second"
    cut_model_peer.update_readme(str(readme), str(json_path), str(csv_path), backbone="mpnet")
    both = readme.read_text()
    assert both.startswith(text) and "<!-- cut-model-peer-mpnet:start -->" in both, "each backbone its own section"
    assert "cut_model_peer --backbone mpnet --from-json" in both
