"""The stream benchmark (:mod:`earlyexit_kernels.bench.stream`) on a device and in a dtype (issue 60).

On ``cuda`` the models are built and their heads calibrated on the GPU in float32, then cast
to the dtype; the sorted batches live there; every timed method ends with
``torch.cuda.synchronize()``; the peak resident set is not measured (it is the host's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DEVICES", "DTYPES", "default_name", "device_label", "on_device", "synced", "torch_dtype", "unavailable"]

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``name`` (``fp32``, ``bf16`` or ``fp16``)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: the stream benchmark runs in {', '.join(DTYPES)}")
    return DTYPES[name]


def unavailable(device: str) -> str | None:
    """Why the benchmark cannot run on ``device`` here, or None where it can."""
    if device not in DEVICES:
        return f"unknown device {device!r}: the stream benchmark runs on {' or '.join(DEVICES)}"
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available (torch.cuda.is_available() is False)"
    return None


def device_label(device: torch.device) -> str:
    """The report's name of ``device``: ``cpu``, or ``cuda (<the GPU's name>)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def default_name(device: str, dtype: str) -> str:
    """``stream_<device>``, and ``_<dtype>`` after it for a dtype other than fp32."""
    return f"stream_{device}" if dtype == "fp32" else f"stream_{device}_{dtype}"


def on_device(batches: list, device: torch.device) -> list:
    """``(positions, input_ids, attention_mask)`` batches with their tensors on ``device``."""
    return [(rows, ids.to(device), mask.to(device)) for rows, ids, mask in batches]


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn``, ending with ``torch.cuda.synchronize()`` on a CUDA device (so that its time is the GPU's too)."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
