"""How a reranking's scores compare with the full model's and with the labels, per query group.

What ``benchmarks/quality/rerank_quality.py`` reports on its test queries (:func:`quality`): mean layers,
recall of the full model's top ``K`` and nDCG@``K`` against it, nDCG@``K`` and MRR against the labels.
``python_tests/test_rerank_bench.py`` checks them on hand-made rankings.
"""

from __future__ import annotations

import torch

from earlyexit_kernels.calibration.rerank import ndcg_at
from earlyexit_kernels.calibration.row_losses import top_k_recall

__all__ = ["K", "full_top_k", "mrr", "quality"]

#: the depth of the ranking that counts
K = 10


def mrr(scores: torch.Tensor, relevance: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over queries of 1 / (rank of the first relevant candidate); ties go to the earlier row."""
    values = []
    for g in torch.unique(groups):
        rows = (groups == g).nonzero().squeeze(-1)
        order = sorted(range(rows.numel()), key=lambda i: (-float(scores[rows[i]]), i))
        first = next((r for r, i in enumerate(order) if relevance[rows[i]] > 0), None)
        values.append(0.0 if first is None else 1.0 / (first + 1))
    return sum(values) / len(values)


def full_top_k(full: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """[N] 1 for the full model's top ``k`` of each query, else 0 (the relevance of "nDCG@k against the full model")."""
    out = torch.zeros_like(groups)
    for g in torch.unique(groups):
        rows = (groups == g).nonzero().squeeze(-1)
        order = sorted(range(rows.numel()), key=lambda i: (-float(full[rows[i]]), i))[:k]
        out[rows[order]] = 1
    return out


def quality(scores, layers, full, relevance, groups) -> dict:
    """The figures of one reranking (``scores`` [N] and ``layers`` run [N]) against the full model's scores
    ``full`` [N] and the labels ``relevance`` [N], per query of ``groups`` [N]."""
    reference = full_top_k(full, groups, K)
    return {
        "mean_layers": layers.float().mean().item(),
        "recall_top10_vs_full": top_k_recall(scores, full, groups, K),
        "ndcg10_vs_full": ndcg_at(scores, reference, groups, K),
        "ndcg10_labels": ndcg_at(scores, relevance, groups, K),
        "mrr_labels": mrr(scores, relevance, groups),
    }
