"""Save and load a patched model: the model as Hugging Face saves it, the exit heads and the policy.

``model.save_pretrained(path)`` of a patched model writes what Hugging Face writes
(``config.json``, ``model.safetensors``, without the exit heads, so that a plain
``AutoModelForSequenceClassification.from_pretrained(path)`` loads it as the original
model) and, next to it, ``early_exit_heads.safetensors`` (the per-layer classifiers,
halting heads and gates) and ``early_exit_config.json`` (the policy, the backend, which
heads exist and the training objective). :func:`from_pretrained` restores all of it:

    model.save_pretrained("out")
    model = eek.from_pretrained("out")                 # the saved policy
    model = eek.from_pretrained("out", eek.Entropy(0.2), attn_implementation="sdpa")

Policies are stored field by field: floats as JSON numbers (Python writes the shortest
text that reads back to the same float), per-layer tuples and ``Scheduled``'s tensor as
lists with their kind, so a round trip gives an equal policy and bit-identical heads.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from . import policies as _policies
from .heads import ExitHeads
from .policies import ExitPolicy

__all__ = ["HEADS_FILE", "CONFIG_FILE", "save_exit_heads", "from_pretrained", "policy_to_dict", "policy_from_dict"]

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


def save_exit_heads(model, save_directory) -> None:
    """Write ``early_exit_heads.safetensors`` and ``early_exit_config.json`` of a patched model."""
    from safetensors.torch import save_file

    from .hf_patch import training_objective

    os.makedirs(save_directory, exist_ok=True)
    heads: ExitHeads = model.early_exit_heads
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(tensors, os.path.join(save_directory, HEADS_FILE), metadata={"format": "pt"})
    chosen = training_objective(model)
    config = {
        "format_version": FORMAT_VERSION,
        "policy": policy_to_dict(model._eek_policy),
        "backend": model._eek_backend,
        "attn_implementation": model.config._attn_implementation,
        "heads": heads.describe(),
        "objective": None if chosen is None else {"name": chosen[0].name, "kwargs": chosen[1]},
    }
    with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _realign(model) -> None:
    """Copy CPU weights that sit at an unaligned address (memory-mapped from the file) into fresh memory.

    CPU matrix kernels may round differently for an unaligned operand, so without this a
    loaded model can differ from the saved one in the last bit of some outputs.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


#: ``from_pretrained`` keyword arguments that also say where Hugging Face finds a file
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _resolve(path, filename: str, kwargs: dict) -> str | None:
    """The local path of ``filename`` in ``path`` (a folder or a Hub model id), or None when it has none.

    Found the way ``transformers`` finds a model's files (:func:`transformers.utils.cached_file`):
    a local folder, else the Hugging Face cache, downloading when online; ``HF_HUB_OFFLINE=1``
    and ``local_files_only=True`` read the cache only.
    """
    if os.path.isdir(path):
        subfolder = kwargs.get("subfolder") or ""
        candidate = os.path.join(path, subfolder, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    return cached_file(
        str(path),
        filename,
        _raise_exceptions_for_missing_entries=False,
        **hub,
    )


def from_pretrained(path, policy: ExitPolicy | None = None, *, backend: str | None = None, model_class=None, **kwargs):
    """Load a model saved by a patched model's ``save_pretrained``, patched, with its heads and policy.

    ``path`` is a local folder or a Hugging Face Hub model id: the exit files are found the
    way ``transformers`` finds the model's (the Hub's cache included, offline with
    ``HF_HUB_OFFLINE=1``). ``policy`` and ``backend`` replace the saved ones when given. ``model_class`` is the
    Hugging Face class used to load the model (default
    ``AutoModelForSequenceClassification``); ``kwargs`` go to its ``from_pretrained``
    (``attn_implementation``, ``dtype``, ``device_map``, ...); the attention implementation
    defaults to the saved model's, so that the outputs are bit-identical. A directory without the exit
    files (a plain Hugging Face model) is loaded and patched with fresh heads, which
    needs ``policy``. Returns the model in eval mode, as ``from_pretrained`` does.
    """
    from safetensors.torch import load_file

    from .hf_patch import _DETACHED_HEADS, _adapter_class, patch, set_training_objective

    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    config_path = _resolve(path, CONFIG_FILE, kwargs)
    saved = None
    if config_path is not None:
        with open(config_path) as f:
            saved = json.load(f)
        if saved.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format_version {saved.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        if saved.get("attn_implementation"):
            kwargs.setdefault("attn_implementation", saved["attn_implementation"])
    elif policy is None:
        raise ValueError(
            f"{path} holds no {CONFIG_FILE} (not saved from a patched model): pass the policy to patch it with, "
            f"e.g. eek.from_pretrained({str(path)!r}, eek.Entropy(0.3))"
        )
    model = model_class.from_pretrained(path, **kwargs)
    _realign(model)
    if saved is None:
        return patch(model, policy, backend or "auto")
    description = saved["heads"]
    if (description["num_layers"], description["hidden_size"]) != (
        model.config.num_hidden_layers,
        model.config.hidden_size,
    ):
        raise ValueError(f"{config_path}: the exit heads were saved for another model shape")
    probe = _adapter_class(model)(model, None)
    heads = ExitHeads(model.config.hidden_size, model.config.num_hidden_layers, probe.final_classifier)
    heads.add_described(description)
    heads_path = _resolve(path, HEADS_FILE, kwargs)
    if heads_path is None:
        raise ValueError(f"{path} has {CONFIG_FILE} but no {HEADS_FILE}: save the patched model again")
    state = load_file(heads_path)
    heads.load_state_dict(state, strict=True)
    vars(model)[_DETACHED_HEADS] = heads
    patch(model, policy if policy is not None else policy_from_dict(saved["policy"]), backend or saved["backend"])
    objective = saved.get("objective")
    if objective is not None:
        try:
            set_training_objective(model, objective["name"], **objective["kwargs"])
        except ValueError:
            pass  # the objective does not fit the policy given instead of the saved one
    return model
