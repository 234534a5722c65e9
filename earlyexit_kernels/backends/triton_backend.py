"""The ``"triton"`` backend: fused exit step, whole per-layer head step and compaction gather in Triton.

Imported by :func:`earlyexit_kernels.backends.registry._load_optional_backends`. When
``triton`` cannot be imported the backend is marked unavailable with the reason and
nothing else happens. The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, for tests) they also run on CPU tensors.
"""

from __future__ import annotations

import os

import torch

from earlyexit_kernels.backends.registry import Backend, mark_unavailable, register_backend


def _register() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        mark_unavailable("triton", f"triton is not installed or cannot be imported ({err})")
        return
    try:
        from earlyexit_kernels.backends.triton_kernels.compact import compact
        from earlyexit_kernels.backends.triton_kernels.exit_step import (
            exit_step,
            exit_step_write_back,
            head_exit_step,
            head_exit_step_write_back,
        )
        from earlyexit_kernels.backends.triton_kernels.pooled_head_step import (
            pooled_head_exit_step,
            pooled_head_exit_step_write_back,
        )
        from earlyexit_kernels.backends.triton_kernels.survivor_gather import gather_survivors
    except Exception as err:  # an incompatible triton or torch: say why instead of failing the import
        mark_unavailable("triton", f"the Triton kernels could not be loaded ({type(err).__name__}: {err})")
        return
    devices = ("cuda",)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        devices = ("cuda", "cpu")
    elif not torch.cuda.is_available():
        mark_unavailable(
            "triton",
            "no CUDA GPU: the Triton kernels run on CUDA tensors (TRITON_INTERPRET=1 runs them in Triton's CPU interpreter)",
        )
        return
    register_backend(
        Backend(
            "triton",
            exit_step,
            compact,
            devices=devices,
            head_exit_step=head_exit_step,
            exit_step_write_back=exit_step_write_back,
            head_exit_step_write_back=head_exit_step_write_back,
            pooled_head_exit_step=pooled_head_exit_step,
            pooled_head_exit_step_write_back=pooled_head_exit_step_write_back,
            pooled_head_devices=devices,
            gather_survivors=gather_survivors,
        )
    )


_register()
