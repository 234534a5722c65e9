"""Checks of a step's token inputs on the host, shared by the patched forward's prologue and the stream engines'
submission: an id outside the vocabulary gets a clear error here, never a device-side assert in a kernel.
"""

from __future__ import annotations

__all__ = ["check_id_range"]


def check_id_range(low: int, high: int, vocab_size: int) -> None:
    """The error for ids outside the vocabulary, before (eager) or instead of (graphed) a kernel's assert."""
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in 0..{vocab_size - 1} (the vocabulary), got values in {low}..{high}")
