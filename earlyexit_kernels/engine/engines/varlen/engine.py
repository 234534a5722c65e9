"""The cohort engine on packed tokens: cohorts filled to a budget of real tokens, run without padding.

text-embeddings-inference fills a batch to ``--max-batch-tokens`` real tokens and runs them
concatenated, with flash attention's varlen kernel; at real lengths (a median of 28 tokens, a tail
to 256) removing the padding saves about as much as early exit does. This engine is the cohort
engine (:mod:`earlyexit_kernels.engine.engines.cohort_engine`: the admission order, cohorts a cohort late
on the host, ``COHORTS_IN_FLIGHT`` in flight) with two changes:

- a cohort takes the next pending rows while their **real** tokens fit ``max_tokens`` (and the rows
  ``max_batch_size``), as TEI's budget counts, not rows x the padded longest;
- it runs the packed-token step (:mod:`earlyexit_kernels.engine.engines.varlen.token_step`): every layer on the
  surviving rows' tokens only, the exits decided and the survivors' tokens gathered on the device,
  each (layer, row bucket, token bucket) step captured in a CUDA graph.

``engine="varlen"`` chooses it (opt-in): ``"auto"`` keeps the padded cohorts until a GPU measures
this engine faster (``eek bench stream``'s (i) beside (f)). It runs BERT-style layers
(:func:`~earlyexit_kernels.engine.engines.varlen.token_step.token_refusal` says why not for another family).
"""

from __future__ import annotations

import numpy as np

from earlyexit_kernels.engine.engines.cohort_engine import CohortEngine
from earlyexit_kernels.engine.engines.varlen.token_step import PackedInputs, run_tokens, token_refusal
from earlyexit_kernels.engine.graphed.static_step import static_batches_of
from earlyexit_kernels.engine.step.step_choice import check_graphed_policy

__all__ = ["VarlenEngine", "packed_cohort_size"]


def packed_cohort_size(lengths: list[int], max_rows: int, max_tokens: int) -> int:
    """How many of the next pending ``lengths`` one packed cohort holds: the most that fit ``max_rows``
    rows and ``max_tokens`` real tokens; at least one (a sequence longer than the budget runs alone)."""
    total = 0
    for count, length in enumerate(lengths, 1):
        total += length
        if count > max_rows or total > max_tokens:
            return max(count - 1, 1)
    return len(lengths)


class VarlenEngine(CohortEngine):
    """:class:`~earlyexit_kernels.engine.engines.cohort_engine.CohortEngine`'s interface and limits; its cohorts
    packed (``max_tokens`` counts real tokens) and run by the packed-token step."""

    def __init__(self, model, config=None, *, choice=None, **limits):
        super().__init__(model, config, choice=choice, **limits)
        reason = token_refusal(self.adapter)
        if reason is not None:
            raise ValueError(f"engine='varlen' cannot run this model: {reason}. Use engine='cohorts'")
        check_graphed_policy(self.policy)
        static_batches_of(self._state)  # the patched model's buffers, beside the graphed step's

    def _fits(self, lengths: list[int]) -> int:
        return packed_cohort_size(lengths, self.max_batch_size, self.max_tokens)

    def _run(self, lengths: np.ndarray, hidden, mask_d, summary):
        inputs = PackedInputs(hidden, summary[0], summary[1], int(lengths.sum()))
        return run_tokens(
            self.adapter, self.heads, self.policy, self.backend, inputs, batches=self._state.static_batches
        )
