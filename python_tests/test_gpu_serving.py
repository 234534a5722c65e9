"""The GPU serving benchmark (earlyexit_kernels/bench/gpu_serving.py) and its TEI-way peer, on the CPU.

TEI's way (packed tokens, varlen attention) equals the unmodified model on the padded batch; the
peers take their batches as Infinity and TEI do; the benchmark runs end to end at a tiny size (its
rehearsal: on the GPU, scripts/gpu_session.sh's serve_gpu step)."""

import csv

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from earlyexit_kernels.bench import gpu_serving
from earlyexit_kernels.bench.gpu_serving import GpuServingConfig, ShapeGraphs, take_like_infinity, take_like_tei
from earlyexit_kernels.bench.packed_bert import pack, packed_logits, varlen_attention_reference


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    return BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()


def _texts(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(5, 50, (int(n),), generator=generator).tolist()
        for n in torch.randint(2, 40, (count,), generator=generator)
    ]


def test_packed_tokens_with_varlen_attention_give_the_padded_models_logits():
    model, texts = _bert(), _texts(9)
    ids, positions, cu, longest = pack(texts, "cpu")
    assert ids.shape == (sum(map(len, texts)),) and cu.tolist()[-1] == ids.shape[0] and longest == max(map(len, texts))
    packed = packed_logits(model, ids, positions, cu, longest, attention=varlen_attention_reference)
    padded = ShapeGraphs(model, torch.device("cpu"))(texts)  # eager on the CPU, rows and length bucketed
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_the_peers_take_their_batches_as_infinity_and_tei_do():
    waiting = [([1] * n, None, 0, None, None) for n in (5, 3, 9, 2)]
    assert take_like_infinity(waiting) == [0, 1, 2, 3]  # fewer than a batch: all, in arrival order
    deep = [([1] * n, None, 0, None, None) for n in range(40, 0, -1)]
    assert take_like_infinity(deep) == list(range(39, 7, -1))  # a deep queue: the 32 shortest
    assert take_like_tei(10)(waiting) == [0, 1]  # 5 + 3 fit 10 tokens, + 9 not
    assert take_like_tei(4)(waiting) == [0]  # one over the budget runs alone


def test_the_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    config = GpuServingConfig(
        device="cpu", dtype="fp32", hidden=32, layers=3, sequences=96, requests=6, levels=("c1", "b32")
    )
    rows = gpu_serving.run(config, tmp_path, name="serve_test", progress=lambda message: None)
    assert {(r["server"], r["level"]) for r in rows} == {
        (s, level) for s in ("eek", "eek-varlen", "infinity-way", "tei-way") for level in ("c1", "b32")
    }
    with open(tmp_path / "serve_test.csv") as file:
        assert len(list(csv.DictReader(file))) == 8
    for row in rows:
        assert row["texts"] == 6 * (1 if row["level"] == "c1" else 32) and row["texts_per_s"] > 0
        if row["server"].startswith("eek"):  # neither engine changes an answer of per-batch early exit
            assert row["same_as_per_batch"] == 1.0
        else:  # the unmodified model, batched otherwise: the same classes
            assert row["agreement"] == 1.0
    table = (tmp_path / "serve_test.md").read_text()
    assert "| b32 | tei-way |" in table and "- b32: eek " in table and "- b32: eek-varlen " in table


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown level"):
        gpu_serving.run(GpuServingConfig(device="cpu", levels=("c7",)), tmp_path)
    with pytest.raises(SystemExit):
        gpu_serving.main(["--device", "cpu", "--requests", "0"])
    assert not list(tmp_path.iterdir())


def test_an_opt_in_engine_whose_warm_up_fails_is_left_out_with_why_and_the_others_serve():
    class Server:
        def __init__(self, fails=False):
            self.fails, self.closed = fails, False

        def close(self):
            self.closed = True

    def run(server):
        if server.fails:
            raise RuntimeError("no varlen kernel")

    varlen = Server(fails=True)
    servers, left_out, said = {"eek": Server(), "eek-varlen": varlen, "tei-way": Server()}, {}, []
    gpu_serving.warm_up(servers, run, left_out, said.append)
    assert list(servers) == ["eek", "tei-way"] and varlen.closed
    assert left_out == {"eek-varlen": "RuntimeError: no varlen kernel"}
    assert said == [
        "  eek: warmed up",
        "  eek-varlen: left out, its warm-up failed: RuntimeError: no varlen kernel",
        "  tei-way: warmed up",
    ]
    with pytest.raises(RuntimeError):  # eek serve's own engine failing stops the run
        gpu_serving.warm_up({"eek": Server(fails=True)}, run, {}, said.append)
    row = {
        "model": "m",
        "device": "d",
        "server": "eek",
        "level": "c1",
        "round": 1,
        "texts_per_s": 1.0,
        "p50_ms": 1.0,
        "p99_ms": 1.0,
        "agreement": 1.0,
        "same_as_per_batch": 1.0,
    }
    assert "eek-varlen left out: its warm-up failed (RuntimeError: no varlen kernel)." in gpu_serving.markdown(
        [row], "x", left_out
    )
