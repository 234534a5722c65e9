"""Helpers shared by the Triton kernels: interpreter detection, launch routing, device
guard and output allocation."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.library import triton_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "cdiv",
    "interpreting",
    "new_empty",
    "poisoned_outputs",
    "next_pow2",
    "pow2_bucket",
    "device_guard",
    "use_ops",
    "register_op",
]

_NO_GUARD = contextlib.nullcontext()

_POISON: list[str | None] = [None]


# Read once: Triton decides at import (when the kernels are decorated) whether it interprets.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` is a constexpr function, slow to call from Python)."""
    return -(-a // b)


def use_ops() -> bool:
    """Whether a wrapper must call its registered ``torch.library`` op instead of launching.

    Under ``torch.compile`` (Dynamo traces the op, Inductor sees its kernels) and under
    any dispatch mode (fake tensors, ``make_fx``, modes that count or record ops), which
    must see the op. In plain eager mode the wrappers launch directly: the op's argument
    handling costs more host time than the kernels take on the GPU.
    """
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def register_op(name: str, *, mutates_args):
    """``torch.library.triton_op`` on a GPU; an opaque ``torch.library.custom_op`` under the interpreter.

    A ``triton_op`` is decomposed into its kernel launches when AOTAutograd traces it (so
    Inductor sees the kernels); the traced launch then runs on fake tensors. Triton's
    interpreter runs kernels on real memory only, so under it the op stays one node of the
    graph and its kernels run when the graph runs. Schema, fake kernel and eager behaviour
    are the same.
    """
    if interpreting():
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return triton_op(name, mutates_args=mutates_args)


def device_guard(tensor: torch.Tensor):
    """Context for a launch on ``tensor``'s device.

    Triton launches on the current device and its current stream: a model on ``cuda:1``
    while device 0 is current would otherwise run its kernels on device 0, reading the
    wrong memory. On the CPU (the interpreter) there is nothing to switch.
    """
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return _NO_GUARD


def next_pow2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def pow2_bucket(value, low: int, high: int | None = None) -> int:
    """The smallest power of two ``>= value``, clamped to ``[low, high]``, as a plain int.

    ``value`` may be a ``SymInt``: a size traced with dynamic shapes (``torch.compile``,
    AOTAutograd), where the registered ops run their launchers on fake tensors. It is then
    only compared with powers of two, so the trace guards on the bucket (``n <= 32``), not on
    the value: hashing it (``functools.lru_cache``) raises, ``int()`` would specialize the
    graph to one size.
    """
    if type(value) is int:
        bucket = next_pow2(value)
        bucket = max(bucket, low)
        return bucket if high is None else min(bucket, high)
    bucket = low
    while (high is None or bucket < high) and value > bucket:
        bucket *= 2
    return bucket


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
