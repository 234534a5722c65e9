"""The shapes of a continuous engine's layer calls: row counts and padded lengths (:class:`ShapeBuckets`).

Eager execution runs every call in its exact shape; compiled execution (``torch.compile``, CUDA
graphs) reuses one graph per shape, so there the shapes come from two small fixed sets. The
scheduler (:mod:`earlyexit_kernels.engine.engines.continuous.scheduler`) plans its calls in these shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ShapeBuckets"]


def _row_counts(max_batch_size: int, bucket_rows: bool) -> tuple[int, ...]:
    if not bucket_rows:
        return tuple(range(1, max_batch_size + 1))
    counts = [c for c in (1, 2, 4, 8, 16, 32) if c < max_batch_size]
    counts += list(range(48, max_batch_size, 16))
    return tuple(counts) + (max_batch_size,)


@dataclass(frozen=True)
class ShapeBuckets:
    """The shapes of a layer call: row counts and padded lengths.

    With ``bucket_rows`` (compiled calls), row counts 1, 2, 4, 8, 16, 32, then every
    multiple of 16, up to ``max_batch_size`` (always included); without, every count (a
    call runs its exact rows). Padded lengths: every multiple of ``length_step`` up to
    ``max_length`` (always included); ``length_step=1`` runs exact lengths. ``max_tokens``
    (optional) caps rows x padded length of a call, like serving systems' ``max_batch_tokens``.
    """

    max_batch_size: int
    max_length: int
    length_step: int = 16
    max_tokens: int | None = None
    bucket_rows: bool = True
    row_counts: tuple[int, ...] = field(init=False)
    lengths: tuple[int, ...] = field(init=False)

    @classmethod
    def exact(cls, max_batch_size: int, max_length: int, max_tokens: int | None = None) -> ShapeBuckets:
        """Every call in its exact shape: what eager execution wants."""
        return cls(max_batch_size, max_length, 1, max_tokens, bucket_rows=False)

    def __post_init__(self):
        for name in ("max_batch_size", "max_length", "length_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
                raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
            if self.max_tokens < self.max_length:
                raise ValueError(
                    f"max_tokens={self.max_tokens} cannot hold one sequence of max_length={self.max_length}; "
                    f"raise max_tokens or lower max_length"
                )
        object.__setattr__(self, "row_counts", _row_counts(self.max_batch_size, self.bucket_rows))
        lengths = tuple(range(self.length_step, self.max_length, self.length_step)) + (self.max_length,)
        object.__setattr__(self, "lengths", lengths)

    def padded_length(self, length: int) -> int:
        """The smallest padded length that holds ``length`` tokens."""
        if not 1 <= length <= self.max_length:
            raise ValueError(f"a sequence of {length} tokens does not fit 1..max_length={self.max_length}")
        return min(math.ceil(length / self.length_step) * self.length_step, self.max_length)

    def padded_rows(self, rows: int) -> int:
        """The smallest row count that holds ``rows`` rows."""
        if not self.bucket_rows:
            return rows
        return next(c for c in self.row_counts if c >= rows)

    def capacity(self, padded_length: int) -> int:
        """Rows a call padded to ``padded_length`` may take: a row count within ``max_tokens``."""
        limit = self.max_batch_size
        if self.max_tokens is not None:
            limit = min(limit, self.max_tokens // padded_length)
        if not self.bucket_rows:
            return max(limit, 1)
        return max(c for c in self.row_counts if c <= max(limit, 1))
