"""Load a model saved by a patched model's ``save_pretrained``: the model, its exit heads and policy.

    model.save_pretrained("out")
    model = eek.from_pretrained("out")                 # the saved policy
    model = eek.from_pretrained("out", eek.Entropy(0.2), attn_implementation="sdpa")

What is saved, and in which form: :mod:`earlyexit_kernels.patching.exit_files`.
"""

from __future__ import annotations

import json
import os

import torch

from earlyexit_kernels.engine.step.heads import ExitHeads
from earlyexit_kernels.methods.policies import ExitPolicy
from earlyexit_kernels.patching.exit_files import CONFIG_FILE, FORMAT_VERSION, HEADS_FILE, policy_from_dict
from earlyexit_kernels.patching.patch import _adapter_class, patch, set_training_objective
from earlyexit_kernels.patching.state import set_detached

__all__ = ["from_pretrained"]


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
    ``HF_HUB_OFFLINE=1``). ``policy`` and ``backend`` replace the saved ones when given (the saved
    step, ``eek.patch``'s ``step``, goes with the saved policy; another policy runs ``"auto"``). ``model_class`` is the
    Hugging Face class used to load the model (default
    ``AutoModelForSequenceClassification``); ``kwargs`` go to its ``from_pretrained``
    (``attn_implementation``, ``dtype``, ``device_map``, ...); the attention implementation
    defaults to the saved model's, so that the outputs are bit-identical. A directory without the exit
    files (a plain Hugging Face model) is loaded and patched with fresh heads, which
    needs ``policy``. Returns the model in eval mode, as ``from_pretrained`` does.
    """
    from safetensors.torch import load_file

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
    adapter_cls = _adapter_class(model)
    probe = adapter_cls(model, None)
    heads = ExitHeads(
        model.config.hidden_size,
        model.config.num_hidden_layers,
        probe.final_classifier,
        # files saved before the head choice existed: the family's default, as they ran
        pooling=description.get("pooling") or adapter_cls.default_pooling(model.config),
        form=description.get("form") or "model",
        mlp_hidden=description.get("mlp_hidden"),
    )
    heads.add_described(description)
    heads_path = _resolve(path, HEADS_FILE, kwargs)
    if heads_path is None:
        raise ValueError(f"{path} has {CONFIG_FILE} but no {HEADS_FILE}: save the patched model again")
    state = load_file(heads_path)
    heads.load_state_dict(state, strict=True)
    set_detached(model, heads)
    # the saved step goes with the saved policy (files from before it existed: "auto", as they ran);
    # another policy gets "auto", which never refuses one
    step = saved.get("step", "auto") if policy is None else "auto"
    policy = policy if policy is not None else policy_from_dict(saved["policy"])
    patch(model, policy, backend or saved["backend"], step=step)
    objective = saved.get("objective")
    if objective is not None:
        try:
            set_training_objective(model, objective["name"], **objective["kwargs"])
        except ValueError:
            pass  # the objective does not fit the policy given instead of the saved one
    return model
