"""Helpers shared by the Triton kernels: interpreter detection and output allocation."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["interpreting", "new_empty", "poisoned_outputs", "next_pow2"]

_POISON: list[str | None] = [None]


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; filled with a sentinel inside :func:`poisoned_outputs`.

    Tests poison every buffer a kernel writes so that an element the kernel forgot to
    write shows up as a wrong value instead of passing by luck.
    """
    mode = _POISON[0]
    if mode is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        value = float("nan") if mode == "a" else -12345.0
    elif dtype == torch.bool:
        value = mode == "a"
    elif dtype == torch.uint8:
        value = 0xA5 if mode == "a" else 0x5A
    else:
        value = -987654321 if mode == "a" else 123456789
        if dtype in (torch.int8, torch.int16):
            value = -77 if mode == "a" else 77
    return torch.full(shape, value, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs(mode: str = "a"):
    """Within the block, every kernel output starts filled with sentinel ``mode`` ("a" or "b")."""
    if mode not in ("a", "b"):
        raise ValueError("mode must be 'a' or 'b'")
    previous = _POISON[0]
    _POISON[0] = mode
    try:
        yield
    finally:
        _POISON[0] = previous
