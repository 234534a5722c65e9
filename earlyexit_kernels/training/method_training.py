"""Each exit method trained as its paper trains it, on a copy of a fine-tuned model.

``TRAINING_POLICIES`` names the methods and the policy each is patched with; :func:`train_method` runs the
method's loss or losses (DeeBERT's and FastBERT's heads-only stage, SmartBERT's two stages) with
:func:`earlyexit_kernels.training.train.train_exit_heads`. The exit-quality benchmark and the
synthetic demo both train the methods side by side with it.
"""

from __future__ import annotations

import copy

from earlyexit_kernels.methods.policies import DACT, Entropy, Patience, QExit, SkipGates, Voting
from earlyexit_kernels.patching.patch import patch
from earlyexit_kernels.training.train import HALTING_LR, train_exit_heads

__all__ = ["TRAINING_POLICIES", "METHOD_EPOCHS", "train_method"]

#: method -> the policy it is patched with for training and evaluation
TRAINING_POLICIES = {
    "pabee": lambda: Patience(2),
    "deebert": lambda: Entropy(0.1),
    "fastbert": lambda: Entropy(0.1, normalized=True),
    "palbert": lambda: QExit(0.5),
    "ensemble": lambda: Voting(3),
    "dact": lambda: DACT(),
    "smartbert": lambda: SkipGates(entropy_threshold=0.1),
}
#: epochs of each method's training where it needs more than ``--epochs``: DACT's halting
#: head moves its logit by 2-4 before a sequence can leave early
METHOD_EPOCHS = {"dact": 3}


def train_method(
    method: str,
    base,
    train_batches,
    *,
    epochs: int,
    lr: float,
    heads_lr: float,
    halting_lr: float | None = HALTING_LR,
    loss_kwargs: dict | None = None,
):
    """A copy of ``base`` trained with ``method``'s loss(es), patched with its policy, in eval mode.

    ``epochs`` is raised to :data:`METHOD_EPOCHS` where the method needs more;
    ``loss_kwargs`` go to the method's loss (DACT's ``tau``).
    """
    model = copy.deepcopy(base)
    policy = TRAINING_POLICIES[method]()
    patch(model, policy)
    common = dict(epochs=max(epochs, METHOD_EPOCHS.get(method, 1)), halting_lr=halting_lr, progress=False)
    if method in ("deebert", "fastbert"):
        name = "deebert_stage2" if method == "deebert" else "fastbert"
        train_exit_heads(model, train_batches, method=name, lr=heads_lr, **common)
    elif method == "smartbert":
        train_exit_heads(model, train_batches, method="smartbert_stage1", lr=lr, **common)
        train_exit_heads(model, train_batches, method="smartbert_stage2", lr=heads_lr, **common)
    else:
        train_exit_heads(model, train_batches, method=method, lr=lr, loss_kwargs=loss_kwargs, **common)
    return model.eval()
