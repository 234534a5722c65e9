"""Which implementation of the exit step and the compaction gather runs.

``"torch"`` (the reference in plain PyTorch) is always there. The fast backends
(``"triton"``, ``"cuda"``, ``"cpp"``) register themselves here when their kernels
are importable; ``backends()`` says which are, ``backend_status()`` why not.
They are imported on the first question asked here, not at ``import earlyexit_kernels``:
importing Triton and registering the ops takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from earlyexit_kernels.backends import compaction
from earlyexit_kernels.backends.reference_rules import with_reference_rules
from earlyexit_kernels.methods import exit_rules

__all__ = ["Backend", "BACKEND_NAMES", "backends", "backend_status", "register_backend", "resolve_backend"]

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    """The two per-layer operations of the engine, for one implementation.

    ``exit_step(policy, layer, num_layers, logits, halting_logit, state)`` and
    ``compact(hidden, mask, index, seq_len)`` have the signatures of
    :func:`earlyexit_kernels.methods.exit_rules.exit_step` and
    :func:`earlyexit_kernels.backends.compaction.compact`. ``devices`` lists the device types
    the backend runs on.

    ``head_exit_step``, when a backend has it, fuses the default head with the exit
    step; it has the signature of :func:`earlyexit_kernels.methods.exit_rules.head_exit_step`
    and the engine uses it at inference instead of the model's pooler and classifier
    modules.

    ``exit_step_write_back`` and ``head_exit_step_write_back`` (signatures of
    :mod:`earlyexit_kernels.backends.write_back`) also write the exiting rows' outputs and give
    the survivor order and count: what the engine calls on a layer where rows may exit.
    Without them the engine runs the backend's exit step, then the PyTorch write-back.

    ``prepare_head_exit_step(policy, layer, num_layers, pooler_weight, pooler_bias,
    head_weight, head_bias)``, when a backend has it, gives ``head_exit_step`` of one layer
    with everything but the rows made ready, as a function ``(cls_hidden, state) -> (exits,
    returned, state)``, or None where it has no such form for these arguments: for an
    engine that calls the same layer's head many times with the same weights.

    ``pooled_head_exit_step(policy, layer, num_layers, hidden, mask, head, state)`` and its
    ``_write_back`` form (signatures of :mod:`earlyexit_kernels.backends.pooled_head`) run the
    whole per-layer step of an internal head, pooling included, on the layer's output [n, S, H]
    (``head``: a :class:`~earlyexit_kernels.backends.pooled_head.FusedExitHead`, either form).
    ``pooled_head_devices``: the device types where that step runs as fused code; elsewhere it
    is PyTorch's pooling and head before the backend's rule, and the engine prefers the fused
    head on the pooled rows where the backend has one. ``prepare_pooled_head_exit_step(policy, layer,
    num_layers, head)``, where a backend has it, gives that step of one layer with everything but the rows made
    ready, ``(hidden, mask, state) -> (exits, returned, state)``, or None where it has no such form.

    ``gather_survivors`` (signature of :func:`earlyexit_kernels.backends.survivor_gather.gather_survivors`,
    its reference, which the graphed step runs where a backend has none): the graphed step's
    bookkeeping after an exit layer in one kernel.
    """

    name: str
    exit_step: Callable
    compact: Callable
    devices: tuple[str, ...]
    head_exit_step: Callable | None = None
    exit_step_write_back: Callable | None = None
    head_exit_step_write_back: Callable | None = None
    prepare_head_exit_step: Callable | None = None
    pooled_head_exit_step: Callable | None = None
    pooled_head_exit_step_write_back: Callable | None = None
    pooled_head_devices: tuple[str, ...] = ("cpu",)
    prepare_pooled_head_exit_step: Callable | None = None
    gather_survivors: Callable | None = None


_REGISTRY: dict[str, Backend] = {
    "torch": Backend("torch", exit_rules.exit_step, compaction.compact, devices=("cpu", "cuda")),
}
_UNAVAILABLE: dict[str, str] = {
    "cpp": "the C++ kernels are not in this version of earlyexit_kernels",
    "triton": "the Triton kernels are not in this version of earlyexit_kernels",
    "cuda": "the CUDA kernels are not in this version of earlyexit_kernels",
}
# "auto": where several of _AUTO_MEASURED can run, the fastest by measurement
# (backend_choice); otherwise the first available of _AUTO_ORDER. Triton on the CPU is
# the interpreter, for tests only: never "auto".
_AUTO_MEASURED = {"cuda": ("cuda", "triton")}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
# The fast kernels take these; other dtypes (float64) run on "torch".
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register_backend(backend: Backend) -> None:
    """Make ``backend`` available; policies its kernels do not lower run the reference step
    (:mod:`earlyexit_kernels.backends.reference_rules`)."""
    _REGISTRY[backend.name] = with_reference_rules(backend)
    _UNAVAILABLE.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    _UNAVAILABLE[name] = reason


def backends() -> dict[str, bool]:
    """Which backends can run here: ``{"torch": True, "cpp": bool, "triton": bool, "cuda": bool}``."""
    _load_optional_backends()
    return {name: name in _REGISTRY for name in BACKEND_NAMES}


def backend_status() -> dict[str, str]:
    """For every backend, ``"available"`` or the reason it is not."""
    _load_optional_backends()
    return {name: "available" if name in _REGISTRY else _UNAVAILABLE.get(name, "unknown") for name in BACKEND_NAMES}


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(n) for n in BACKEND_NAMES)}; got {name!r}")


def _runs_on(name: str, device: torch.device) -> bool:
    _load_optional_backends()
    return name in _REGISTRY and device.type in _REGISTRY[name].devices


def resolve_backend(
    name: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    hidden_size: int | None = None,
    num_labels: int | None = None,
) -> Backend:
    """The backend to use for tensors on ``device``; ``RuntimeError`` if ``name`` cannot run there.

    For ``"auto"`` with ``dtype``, ``hidden_size`` and ``num_labels`` given, where more
    than one fast backend can run on the device (Triton and the CUDA C++ kernels on a
    GPU), the choice is the faster one as timed by :mod:`earlyexit_kernels.backends.choice`.
    A ``dtype`` the fast kernels do not take (float64) runs on ``"torch"``: ``"auto"`` picks
    it, another fast backend's name raises ``RuntimeError`` saying so.
    """
    check_backend_name(name)
    _load_optional_backends()
    if name != "torch" and dtype is not None and dtype not in FAST_DTYPES:
        if name == "auto":
            return _REGISTRY["torch"]
        raise RuntimeError(
            f"backend {name!r} runs float32, float16 and bfloat16 models, not {str(dtype).removeprefix('torch.')}; "
            f"use backend='torch' (or 'auto', which picks it for this dtype)"
        )
    if name == "auto":
        measured = [n for n in _AUTO_MEASURED.get(device.type, ()) if _runs_on(n, device)]
        if len(measured) > 1 and None not in (dtype, hidden_size, num_labels):
            from earlyexit_kernels.backends.choice import choose

            key = (str(device), str(dtype).removeprefix("torch."), int(hidden_size), int(num_labels))
            chosen = choose([_REGISTRY[n] for n in measured], key)
            if chosen is not None:
                return chosen
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if candidate in _REGISTRY and device.type in _REGISTRY[candidate].devices:
                return _REGISTRY[candidate]
        return _REGISTRY["torch"]
    if name not in _REGISTRY:
        raise RuntimeError(f"backend {name!r} is not available: {_UNAVAILABLE.get(name, 'unknown reason')}")
    backend = _REGISTRY[name]
    if device.type not in backend.devices:
        raise RuntimeError(
            f"backend {name!r} runs on {', '.join(backend.devices)} tensors but the model is on {device.type}"
        )
    return backend


_LOADED = [False]


def _load_optional_backends() -> None:
    """Import the fast backends once; each registers itself or says why it cannot run."""
    if _LOADED[0]:
        return
    _LOADED[0] = True
    import importlib

    for module in ("cpp_backend", "triton_backend"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise
