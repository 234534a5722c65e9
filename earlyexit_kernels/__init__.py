"""earlyexit_kernels: batched early exit for BERT-like encoders, with the batch compacted on the device.

    import earlyexit_kernels as eek
    model = eek.patch(model, eek.Patience(2))
    out = model(input_ids=ids, attention_mask=mask)
    out.logits, out.exit_layer, out.layers_run

Many sequences run through a stream engine (``eek.classify``, ``eek serve``), chosen once per call: the
continuous engine on the CPU (layer calls refilled from per-layer queues), the cohort engine on CUDA
(length-sorted cohorts through the graphed step, captured in CUDA graphs), and two opt-in GPU engines,
layer segments and packed tokens (``engine="segments"``, ``engine="varlen"``) that no GPU has measured yet.
They live in ``earlyexit_kernels.engine``'s wings (entry, engines, stream, graphed, step, layers).

The public API is described in ``docs/api.md``; the semantics of each exit method in
``docs/exit_methods.md``; the package's layout in ``docs/architecture.md``.
"""

from typing import TYPE_CHECKING

from earlyexit_kernels._version import __version__ as __version__

if TYPE_CHECKING:
    from earlyexit_kernels.backends.registry import backend_status
    from earlyexit_kernels.engine.entry.audit import AuditWatch
    from earlyexit_kernels.engine.entry.classify import Prediction
    from earlyexit_kernels.engine.entry.rerank import Ranked, rerank
    from earlyexit_kernels.integrations.classify import classify
    from earlyexit_kernels.methods.policies import (
        DACT,
        Entropy,
        ExitPolicy,
        MaxProb,
        MultiLabelConfidence,
        Patience,
        QExit,
        Scheduled,
        ScoreBand,
        SkipGates,
        Voting,
    )
    from earlyexit_kernels.patching.loading import from_pretrained
    from earlyexit_kernels.patching.patch import (
        SUPPORTED_MODELS,
        EarlyExitOutput,
        backend_of,
        head_config,
        is_patched,
        patch,
        policy_of,
        set_training_objective,
        training_objective,
        unpatch,
    )

# Public name -> the module that defines it. The package imports nothing at ``import
# earlyexit_kernels`` (torch, transformers and the kernels take seconds to import, and the command
# line's --help needs none of them): a name is imported on first use (PEP 562). A new public
# name goes here and in __all__.
_EXPORTS = {
    "backend_status": "earlyexit_kernels.backends.registry",
    "AuditWatch": "earlyexit_kernels.engine.entry.audit",
    "Prediction": "earlyexit_kernels.engine.entry.classify",
    "classify": "earlyexit_kernels.integrations.classify",
    "Ranked": "earlyexit_kernels.engine.entry.rerank",
    "rerank": "earlyexit_kernels.engine.entry.rerank",
    "SUPPORTED_MODELS": "earlyexit_kernels.patching.patch",
    "EarlyExitOutput": "earlyexit_kernels.patching.patch",
    "backend_of": "earlyexit_kernels.patching.patch",
    "head_config": "earlyexit_kernels.patching.patch",
    "is_patched": "earlyexit_kernels.patching.patch",
    "patch": "earlyexit_kernels.patching.patch",
    "policy_of": "earlyexit_kernels.patching.patch",
    "set_training_objective": "earlyexit_kernels.patching.patch",
    "training_objective": "earlyexit_kernels.patching.patch",
    "unpatch": "earlyexit_kernels.patching.patch",
    "from_pretrained": "earlyexit_kernels.patching.loading",
    "DACT": "earlyexit_kernels.methods.policies",
    "Entropy": "earlyexit_kernels.methods.policies",
    "ExitPolicy": "earlyexit_kernels.methods.policies",
    "MaxProb": "earlyexit_kernels.methods.policies",
    "MultiLabelConfidence": "earlyexit_kernels.methods.policies",
    "Patience": "earlyexit_kernels.methods.policies",
    "QExit": "earlyexit_kernels.methods.policies",
    "Scheduled": "earlyexit_kernels.methods.policies",
    "ScoreBand": "earlyexit_kernels.methods.policies",
    "SkipGates": "earlyexit_kernels.methods.policies",
    "Voting": "earlyexit_kernels.methods.policies",
}

__all__ = [
    "AuditWatch",
    "DACT",
    "EarlyExitOutput",
    "Entropy",
    "ExitPolicy",
    "MaxProb",
    "MultiLabelConfidence",
    "Prediction",
    "Ranked",
    "Patience",
    "QExit",
    "SUPPORTED_MODELS",
    "Scheduled",
    "ScoreBand",
    "SkipGates",
    "Voting",
    "backend_of",
    "backend_status",
    "backends",
    "classify",
    "from_pretrained",
    "head_config",
    "is_patched",
    "patch",
    "policy_of",
    "rerank",
    "set_training_objective",
    "training_objective",
    "unpatch",
]


# The subpackage ``backends`` shares its name with the function ``backends``. Importing a
# subpackage sets it as an attribute of this package the first time; imported here (it
# holds only a docstring), the later imports of its modules leave the function alone.
import earlyexit_kernels.backends  # noqa: E402, F401


def backends() -> dict[str, bool]:
    """Which backends can run here: see :func:`earlyexit_kernels.backends.registry.backends`."""
    from earlyexit_kernels.backends.registry import backends as available

    return available()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
