"""The record of what ``eek.patch`` gives a model, as the engine reads it.

:mod:`earlyexit_kernels.patching` is the only owner of this record on a model: it attaches,
replaces and removes it, and nothing else reads the model's attributes for it. The engine sits
below the patching package (``eek.patch`` runs the engine's batch loop), yet its public entry
points (``eek.classify``, ``eek.rerank``, the continuous and background engines) take a user's
patched model; they read the record through :func:`patched_state`, which asks the reader the
patching package registers when it is imported. No model can be patched before that import, so
a model the reader does not know is a model nobody patched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["PatchedState", "patched_state", "register_reader"]


@dataclass
class PatchedState:
    """What a patched model carries beside its ``early_exit_heads`` module.

    ``policy``: the exit policy it runs. ``backend``: the backend name it was given (``"auto"``,
    ``"torch"``, ...). ``adapter``: its family's :class:`~earlyexit_kernels.models.base.EncoderAdapterBase`
    over the model's modules (rebuilt by the reader where a module it holds was replaced, as
    quantization after patching does). ``adapter_paths``: where the adapter's modules sit in the
    model, to notice that. ``objective``: the training objective and its loss arguments, or None.
    ``step``: the per-layer step it was given (``"auto"``, ``"exact"`` or ``"graphed"``, see
    :mod:`earlyexit_kernels.engine.step.step_choice`); ``static_batches``: what the graphed step keeps
    between forwards (buffers and CUDA graphs, by shape), made on its first forward;
    ``kept_engines``: the continuous engines ``eek.classify`` keeps between calls on the graphed step
    (:mod:`earlyexit_kernels.engine.entry.kept_engines`), made on its first such call.
    """

    policy: ExitPolicy
    backend: str
    adapter: Any
    adapter_paths: dict[str, str] | None = None
    objective: tuple[Any, dict] | None = None
    step: str = "auto"
    static_batches: Any = None
    kept_engines: Any = None


_reader: Callable[[nn.Module], PatchedState | None] | None = None


def register_reader(reader: Callable[[nn.Module], PatchedState | None]) -> None:
    """Called once by :mod:`earlyexit_kernels.patching`: how to read a model's record."""
    global _reader
    _reader = reader


def patched_state(model: nn.Module, needed_by: str) -> PatchedState:
    """``model``'s record; ``ValueError`` naming ``needed_by`` where it is not patched."""
    state = _reader(model) if _reader is not None else None
    if state is None:
        raise ValueError(f"{needed_by} needs a model patched with eek.patch(model, policy)")
    return state
