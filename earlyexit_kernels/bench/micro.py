"""Microbenchmarks of the two per-layer operations, per implementation.

Exit step (the head on the [CLS] state, then the policy's rule), on ``[B, S, H]`` hidden
states, policy ``Entropy(0.3)``, 2 labels:

- ``cpp`` / ``triton`` / ``cuda``: the backend's fused ``head_exit_step``;
- ``torch``: :func:`earlyexit_kernels.methods.exit_rules.head_exit_step` (the eager reference, as
  one function);
- ``naive``: the model's pooler and classifier modules, then the eager exit step, then the
  boolean-mask write-back of the exiting rows, as :func:`.baselines.naive_batched` does.

Compaction (keep every other row, trim 1/8 of the positions):

- ``cpp`` / ``triton`` / ``cuda``: the backend's gather kernel;
- ``torch``: :func:`earlyexit_kernels.backends.compaction.compact` (``index_select`` + slice);
- ``naive``: ``hidden[keep]`` and ``mask[keep]`` (boolean indexing, no trimming).

Used by the suite (the exit-step plot) and by ``benchmarks/micro/bench_cpu_micro.py``
(pytest-benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from earlyexit_kernels.backends import compaction
from earlyexit_kernels.backends.registry import backends, resolve_backend
from earlyexit_kernels.methods import exit_rules
from earlyexit_kernels.methods.policies import Entropy

__all__ = ["MICRO_POLICY", "fast_backends", "micro_impls", "exit_step_fn", "compact_fn"]

MICRO_POLICY = Entropy(0.3)
LABELS = 2


def fast_backends(device: torch.device) -> list[str]:
    """The compiled backends that run on ``device``. Triton on the CPU (its interpreter) is left
    out: its timings mean nothing."""
    names = []
    for name in ("cuda", "triton", "cpp"):
        if not backends()[name] or (name == "triton" and device.type != "cuda"):
            continue
        try:
            resolve_backend(name, device)
        except RuntimeError:
            continue
        names.append(name)
    return names


def micro_impls(device: torch.device) -> list[str]:
    """The implementations that run on ``device``: fast backends first, then torch and naive."""
    return [*fast_backends(device), "torch", "naive"]


def _weights(hidden_size: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    wp = torch.randn(hidden_size, hidden_size, generator=g) / math.sqrt(hidden_size)
    wi = torch.randn(LABELS, hidden_size, generator=g) / math.sqrt(hidden_size)
    return [t.to(device=device, dtype=dtype) for t in (wp, torch.zeros(hidden_size), wi, torch.zeros(LABELS))]


def exit_step_fn(
    impl: str, batch: int, seq_len: int, hidden_size: int, num_layers: int, device, dtype, seed: int = 0
) -> Callable[[], object]:
    """A no-argument callable running one exit step of ``impl`` at layer 3 on ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    wp, bp, wi, bi = _weights(hidden_size, device, dtype, seed + 1)
    state = exit_rules.init_state(MICRO_POLICY, batch, LABELS, hidden_size, num_layers, device, pooled_dtype=dtype)
    policy, layer = MICRO_POLICY, 3
    if impl == "naive":
        pooler = torch.nn.Linear(hidden_size, hidden_size).to(device=device, dtype=dtype)
        classifier = torch.nn.Linear(hidden_size, LABELS).to(device=device, dtype=dtype)
        with torch.no_grad():
            pooler.weight.copy_(wp), pooler.bias.copy_(bp), classifier.weight.copy_(wi), classifier.bias.copy_(bi)
        out_logits = torch.zeros(batch, LABELS, dtype=dtype, device=device)
        rows = torch.arange(batch, device=device)

        def run():
            logits = classifier(torch.tanh(pooler(hidden[:, 0])))
            exits, returned, _ = exit_rules.exit_step(policy, layer, num_layers, logits, None, state)
            out_logits[rows[exits]] = returned[exits].to(dtype)
            return exits

        return run
    fn = exit_rules.head_exit_step if impl == "torch" else resolve_backend(impl, device).head_exit_step

    def run():
        return fn(policy, layer, num_layers, hidden[:, 0], wp, bp, wi, bi, state)

    return run


def compact_fn(impl: str, batch: int, seq_len: int, hidden_size: int, device, dtype, seed: int = 0):
    """``(callable, bytes moved)`` for one compaction of ``impl``: every other row kept, 1/8 of S trimmed."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    keep = torch.arange(batch, device=device) % 2 == 0
    count = int(keep.sum())
    index = compaction.survivor_index(keep, count)
    new_len = max(1, seq_len - seq_len // 8)
    if impl == "naive":

        def run():
            return hidden[keep], mask[keep]

        moved = 2 * count * seq_len * (hidden_size * hidden.element_size() + mask.element_size())
        return run, moved
    fn = compaction.compact if impl == "torch" else resolve_backend(impl, device).compact

    def run():
        return fn(hidden, mask, index, new_len)

    return run, 2 * count * new_len * (hidden_size * hidden.element_size() + mask.element_size())
