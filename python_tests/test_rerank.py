"""Cross-encoder rerankers (one output, ``num_labels == 1``): ``ScoreBand``, ``eek.rerank`` and its calibration.

A candidate leaves when its score is at most ``low`` (or at least ``high``); every backend
decides as the reference; at full depth the scores are the unpatched model's;
``eek.rerank`` ranks the pairs best first with each pair's own score; calibration keeps
the full model's top k.
"""

import math

import pytest
import torch
from conftest import tiny_batch, tiny_model, word_texts
from model_comparison import assert_same_function
from served_models import cross_encoder_folder, spread

import earlyexit_kernels as eek
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.calibration.rerank import calibrate_rerank, ndcg_at
from earlyexit_kernels.calibration.row_losses import top_k_recall
from earlyexit_kernels.integrations.model_folder import load_model
from earlyexit_kernels.methods.exit_rules import exit_step
from earlyexit_kernels.training.calibrate_model import record_exits


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    return load_model(cross_encoder_folder(tmp_path_factory.mktemp("cross_encoder")))


def test_score_band_is_its_definition():
    scores = torch.tensor([[-3.0], [-1.0], [0.0], [1.0], [2.5], [math.nan], [-math.inf]])
    decide = lambda policy: exit_step(policy, 1, 4, scores, None, {})[0].tolist()  # noqa: E731
    assert decide(eek.ScoreBand(low=-1.0)) == [True, True, False, False, False, False, False]
    assert decide(eek.ScoreBand(high=2.0)) == [False, False, False, False, True, False, False]
    assert decide(eek.ScoreBand(-1.0, 2.0)) == [True, True, False, False, True, False, False]
    assert all(exit_step(eek.ScoreBand(low=-1.0), 4, 4, scores, None, {})[0])
    torch.testing.assert_close(
        exit_step(eek.ScoreBand(low=0.0), 1, 4, scores, None, {})[1], scores, rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({}, "give low"), ({"low": 1.0, "high": 1.0}, "low must be below high"), ({"low": math.inf}, "finite")],
)
def test_bad_bands_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        eek.ScoreBand(**arguments)


def test_score_band_needs_one_output():
    with pytest.raises(ValueError, match="num_labels == 1"):
        eek.patch(tiny_model("bert", num_labels=3), eek.ScoreBand(low=0.0))


@pytest.mark.exact
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_every_backend_decides_as_the_reference_and_is_exact_at_full_depth(backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r} is not available here: {eek.backend_status()[backend]}")
    ids, mask, types = tiny_batch(16, 10, seed=7)
    with torch.no_grad():
        model = tiny_model("bert", num_labels=1)
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        eek.patch(model, eek.ScoreBand(low=-1e6), backend=backend)
        never = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        assert torch.equal(never.logits, full), "at full depth the scores are the unpatched model's"
        layer2 = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits[1, :, 0].sort().values
        middle = float(layer2[7] + layer2[8]) / 2
        eek.patch(model, eek.ScoreBand(low=middle), backend=backend)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        eek.patch(model, eek.policy_of(model), backend="torch")
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert spread(out.exit_layer.tolist())
    assert torch.equal(out.exit_layer, reference.exit_layer)
    assert torch.equal(out.logits, reference.logits)
    # Rows that ran every layer did so in a batch compacted around them: the same function as
    # the full batch, to rounding (model_comparison.py).
    last = out.exit_layer == 4
    assert_same_function(out.logits[last], full[last])


def test_rerank_ranks_every_pair_by_its_own_score(cross_encoder):
    model, tokenizer = cross_encoder
    query, texts = "w3 w4", [t or "w9" for t in word_texts(24, seed=5)]
    ranked = eek.rerank(model, query, texts, tokenizer=tokenizer, return_text=True)
    assert sorted(r.index for r in ranked) == list(range(len(texts)))
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert spread([r.exit_layer for r in ranked])
    with torch.no_grad():
        for r in ranked:
            alone = model(**tokenizer(query, texts[r.index], return_tensors="pt"))
            assert r.score == pytest.approx(float(torch.sigmoid(alone.logits[0, 0])), abs=1e-6)
            assert r.exit_layer == int(alone.exit_layer[0])
            assert r.text == texts[r.index]
    raw = eek.rerank(model, query, texts, tokenizer=tokenizer, raw_scores=True, top_n=5)
    assert [r.index for r in raw] == [r.index for r in ranked[:5]]
    assert raw[0].score == pytest.approx(math.log(ranked[0].score / (1 - ranked[0].score)), abs=1e-4)
    assert raw[0].text is None


def test_rerank_refuses_a_classifier_and_bad_arguments(cross_encoder, saved_classifier):
    model, tokenizer = cross_encoder
    with pytest.raises(ValueError, match="num_labels == 1"):
        eek.rerank(load_model(saved_classifier)[0], "q", ["a"], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="list of strings"):
        eek.rerank(model, "q", "one text", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="top_n"):
        eek.rerank(model, "q", ["a"], tokenizer=tokenizer, top_n=0)


def test_top_k_recall_and_ndcg_by_hand():
    groups = torch.tensor([0, 0, 0, 1, 1])
    full = torch.tensor([3.0, 2.0, 1.0, 5.0, 4.0])
    early = torch.tensor([3.0, 0.0, 1.0, 4.0, 5.0])
    assert top_k_recall(early, full, groups, k=2) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert top_k_recall(full, full, groups, k=2) == 1.0
    relevance = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    ideal_1, second_1 = 1.0, 1 / math.log2(3)
    assert ndcg_at(full, relevance, groups, k=2) == pytest.approx((1.0 + second_1 / ideal_1) / 2)


def test_calibration_keeps_the_full_models_top_k(cross_encoder):
    model, tokenizer = cross_encoder
    queries = [q or "w1" for q in word_texts(6, seed=8, longest=4)]
    rows, groups = [], []
    for g, query in enumerate(queries):
        for text in word_texts(12, seed=20 + g):
            rows.append(tokenizer(query, text or "w2", padding="max_length", max_length=40, return_tensors="pt"))
            groups.append(g)
    batch = {key: torch.cat([r[key] for r in rows]) for key in ("input_ids", "attention_mask", "token_type_ids")}
    record = record_exits(model, batch)
    groups = torch.tensor(groups)
    strict = calibrate_rerank(record, groups, k=3, min_recall=1.0)
    assert strict.met and strict.recall == 1.0
    replayed = replay(strict.policy, record)
    assert top_k_recall(replayed.logits[:, 0], record.all_logits[-1, :, 0], groups, k=3) == 1.0
    loose = calibrate_rerank(record, groups, k=3, target_layers=1.0)
    assert loose.mean_layers <= 1.0 and loose.policy.low >= strict.policy.low
    assert min(p.mean_layers for p in strict.curve) == pytest.approx(1.0)
    assert max(p.mean_layers for p in strict.curve) == pytest.approx(4.0), "the curve reaches full depth"
