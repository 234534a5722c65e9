"""earlyexit_kernels: batched early exit for BERT-like encoders, with the batch compacted on the device.

    import earlyexit_kernels as eek
    model = eek.patch(model, eek.Patience(2))
    out = model(input_ids=ids, attention_mask=mask)
    out.logits, out.exit_layer, out.layers_run

The public API is described in ``docs/api.md``; the semantics of each exit method in
``docs/exit_methods.md``; the package's layout in ``docs/architecture.md``.
"""

from earlyexit_kernels.backends.registry import _load_optional_backends, backend_status, backends
from earlyexit_kernels.engine.classify import Prediction, classify
from earlyexit_kernels.engine.rerank import Ranked, rerank
from earlyexit_kernels.integrations.hf_patch import (
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
from earlyexit_kernels.integrations.loading import from_pretrained
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

__version__ = "0.1.0"

_load_optional_backends()

__all__ = [
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
