"""The early-exit files saved next to a Hugging Face model, and the policy's exact JSON form.

``model.save_pretrained(path)`` of a patched model writes what Hugging Face writes
(``config.json``, ``model.safetensors``, without the exit heads, so that a plain
``AutoModelForSequenceClassification.from_pretrained(path)`` loads it as the original
model) and, next to it, the two files written here: ``early_exit_heads.safetensors``
(the per-layer classifiers, halting heads and gates) and ``early_exit_config.json``
(the policy, the backend, the step, which heads exist, the internal heads' pooling, form and MLP
width, and the training objective).
:func:`earlyexit_kernels.patching.loading.from_pretrained` reads them back.

Policies are stored field by field: floats as JSON numbers (Python writes the shortest
text that reads back to the same float), per-layer tuples and ``Scheduled``'s tensor as
lists with their kind, so a round trip gives an equal policy and bit-identical heads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from earlyexit_kernels.engine.step.heads import ExitHeads
from earlyexit_kernels.engine.step.patched_state import PatchedState
from earlyexit_kernels.methods import policies as _policies
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = ["HEADS_FILE", "CONFIG_FILE", "FORMAT_VERSION", "save_exit_heads", "policy_to_dict", "policy_from_dict"]

HEADS_FILE = "early_exit_heads.safetensors"
CONFIG_FILE = "early_exit_config.json"
FORMAT_VERSION = 1
_POLICY_TYPES = {name: getattr(_policies, name) for name in _policies.__all__ if name != "ExitPolicy"}


def _encode(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    return value


def _decode(value):
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    return value


def policy_to_dict(policy: ExitPolicy) -> dict:
    """``{"type": "Entropy", "fields": {...}}``, JSON-ready and exact (see the module docstring)."""
    name = type(policy).__name__
    if _POLICY_TYPES.get(name) is not type(policy):
        raise TypeError(f"cannot save a policy of type {name}; expected one of {', '.join(_POLICY_TYPES)}")
    fields = {f.name: _encode(getattr(policy, f.name)) for f in dataclasses.fields(policy)}
    return {"type": name, "fields": fields}


def policy_from_dict(data: dict) -> ExitPolicy:
    """The policy :func:`policy_to_dict` described."""
    cls = _POLICY_TYPES.get(data.get("type"))
    if cls is None:
        raise ValueError(f"unknown exit policy type {data.get('type')!r} in {CONFIG_FILE}")
    return cls(**{k: _decode(v) for k, v in data["fields"].items()})


def save_exit_heads(model, save_directory, state: PatchedState) -> None:
    """Write ``early_exit_heads.safetensors`` and ``early_exit_config.json`` of a patched model,
    whose record ``state`` holds the policy, the backend and the training objective (or None)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    heads: ExitHeads = model.early_exit_heads
    objective = state.objective
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(tensors, os.path.join(save_directory, HEADS_FILE), metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "policy": policy_to_dict(state.policy),
        "backend": state.backend,
        "step": state.step,
        "attn_implementation": model.config._attn_implementation,
        "heads": heads.describe(),
        "objective": None if objective is None else {"name": objective[0].name, "kwargs": objective[1]},
    }
    with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
