"""The one record a patched model carries, and the only code that reads or writes it on a model.

``eek.patch`` attaches a :class:`~earlyexit_kernels.engine.step.patched_state.PatchedState` (policy,
backend, adapter, training objective) under one private attribute; the exit heads are the
model's ``early_exit_heads`` module (saved with it); ``eek.unpatch`` removes the record and keeps
the heads aside for a later ``patch``. Every other module asks the functions here (or, below
this package, :func:`earlyexit_kernels.engine.step.patched_state.patched_state`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from earlyexit_kernels.engine.layers.module_weights import module_paths, replaced_modules
from earlyexit_kernels.engine.step import patched_state as engine_record
from earlyexit_kernels.engine.step.patched_state import PatchedState

__all__ = [
    "PatchedState",
    "HEADS",
    "attach",
    "detach",
    "is_patched",
    "state_of",
    "read",
    "using_backend",
    "detached",
    "set_detached",
    "drop_detached_heads",
]

HEADS = "early_exit_heads"  # the heads' module name: its parameters are the model's
_STATE = "_eek_state"
_DETACHED_HEADS = "_eek_detached_heads"


def attach(model: nn.Module, state: PatchedState) -> None:
    """Give ``model`` its record (replacing any); the adapter's module paths are noted here."""
    state.adapter_paths = module_paths(state.adapter, model)
    vars(model)[_STATE] = state


def detach(model: nn.Module) -> PatchedState:
    return vars(model).pop(_STATE)


def is_patched(model) -> bool:
    return "forward" in vars(model) and vars(model).get(_STATE) is not None


def state_of(model: nn.Module, needed_by: str = "this") -> PatchedState:
    """The record of a patched ``model``; ``ValueError`` naming ``needed_by`` where it is not patched."""
    if not is_patched(model):
        raise ValueError(f"{needed_by}: the model is not patched; call eek.patch(model, policy) first")
    return vars(model)[_STATE]


def read(model: nn.Module) -> PatchedState | None:
    """The record with an adapter over the model's modules as they are now, or None where not patched.

    ``torch.ao.quantization.quantize_dynamic`` after ``eek.patch`` copies the model and swaps its
    Linear layers (the classifier, the pooler's) for quantized ones; the adapter must then read the
    quantized ones, as the unpatched quantized model does.
    """
    if not is_patched(model):
        return None
    state = vars(model)[_STATE]
    if state.adapter_paths is None or replaced_modules(state.adapter, model, state.adapter_paths):
        state.adapter = type(state.adapter)(model, getattr(model, HEADS))
        state.adapter_paths = module_paths(state.adapter, model)
    return state


@contextlib.contextmanager
def using_backend(model: nn.Module, backend: str) -> Iterator[None]:
    """Run ``model`` with another backend for the duration (the policy and heads stay)."""
    state = state_of(model, "using_backend")
    before, state.backend = state.backend, backend
    try:
        yield
    finally:
        state.backend = before


def detached(model: nn.Module) -> tuple[nn.Module | None, tuple | None]:
    """What ``eek.unpatch`` kept aside for a later ``patch``: ``(heads, training objective)``,
    each None where there is none."""
    return vars(model).get(_DETACHED_HEADS, (None, None))


def set_detached(model: nn.Module, heads: nn.Module, objective: tuple | None = None) -> None:
    vars(model)[_DETACHED_HEADS] = (heads, objective)


def drop_detached_heads(model: nn.Module) -> None:
    """Forget heads kept aside (the next ``patch`` builds fresh ones)."""
    vars(model).pop(_DETACHED_HEADS, None)


engine_record.register_reader(read)
