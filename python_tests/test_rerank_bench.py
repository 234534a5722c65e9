"""The measures of ``benchmarks/quality/rerank_quality.py`` (:mod:`benchmarks.suite.rerank_measures`) on
hand-made rankings (no model, no real material)."""

import pytest
import torch

from benchmarks.suite import rerank_measures


@pytest.fixture(scope="module")
def bench():
    return rerank_measures


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant(bench):
    scores = torch.tensor([0.9, 0.5, 0.1, 0.2, 0.8, 0.3])
    relevance = torch.tensor([0, 1, 0, 0, 0, 0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # query 0: the relevant row is second; query 1 has none (0)
    assert bench.mrr(scores, relevance, groups) == pytest.approx((1 / 2 + 0) / 2)
    # ties go to the earlier row
    assert bench.mrr(torch.zeros(3), torch.tensor([0, 0, 1]), torch.zeros(3, dtype=torch.long)) == pytest.approx(1 / 3)


def test_full_top_k_marks_each_querys_best_rows(bench):
    full = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert bench.full_top_k(full, groups, 2).tolist() == [1, 0, 1, 0, 1, 1]


def test_the_full_model_against_itself_is_perfect(bench):
    full = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 4.0, -1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    relevance = torch.tensor([1, 0, 0, 0, 0, 1, 0])
    quality = bench.quality(full, torch.full((7,), 6), full, relevance, groups)
    assert quality["mean_layers"] == 6
    assert quality["recall_top10_vs_full"] == 1.0
    assert quality["ndcg10_vs_full"] == pytest.approx(1.0)
    assert quality["mrr_labels"] == pytest.approx((1 + 1 / 2) / 2)
    reversed_order = bench.quality(-full, torch.full((7,), 1), full, relevance, groups)
    assert reversed_order["mean_layers"] == 1
    assert reversed_order["mrr_labels"] < quality["mrr_labels"]
