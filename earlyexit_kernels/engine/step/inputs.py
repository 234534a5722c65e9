"""Checks of a step's token inputs on the host, shared by the patched forward's prologue and the stream engines'
submission: an id outside the vocabulary gets a clear error here, never a device-side assert in a kernel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_id_range", "check_ids"]


def check_id_range(low: int, high: int, vocab_size: int) -> None:
    """The error for ids outside the vocabulary, before (eager) or instead of (graphed) a kernel's assert."""
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in 0..{vocab_size - 1} (the vocabulary), got values in {low}..{high}")


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
    """:func:`check_id_range` for a sequence's ids (int64, at least one), in one pass: read as unsigned, a negative
    id is past the vocabulary too, so one maximum decides, and the range is read only for the error (a
    stream engine checks every submission, and two reductions cost more than the rest of a submission)."""
    if np.maximum.reduce(ids.view(np.uint64)) >= vocab_size:
        check_id_range(int(ids.min()), int(ids.max()), vocab_size)
