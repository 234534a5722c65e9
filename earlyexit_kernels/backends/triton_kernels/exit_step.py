"""Fused exit step in Triton: the wrappers with the reference's signatures, over two launches per layer at most.

1. The head kernel (:mod:`.exit_head`, only for :func:`head_exit_step`): ``pooled = tanh(W_p h + b_p)``
   on the [CLS] rows and the partial logits of each column tile of ``pooled``, fp32 ``[T, n, C]``.
2. The decision kernel (:mod:`.exit_decide`): sums the partials, adds ``b_i``, rounds the logits to
   the model dtype and applies the policy, with the optional write-back and survivor order.

For QExit and DACT the halting head (an arbitrary small MLP) runs in PyTorch between
the two launches: ``halting_fn(pooled, state.get("prev_pooled"))``.

:func:`exit_step` and :func:`head_exit_step` have the signatures and return
conventions of :func:`earlyexit_kernels.methods.exit_rules.exit_step` and
:func:`earlyexit_kernels.methods.exit_rules.head_exit_step`. No host sync happens inside:
every decision stays on the device.

Host cost. In eager mode the wrappers launch the kernels themselves (one Python call,
the outputs a step needs and nothing else). The same launchers are registered with
``torch.library`` as ``earlyexit::exit_head`` and ``earlyexit::exit_decide``; those ops
are what runs under ``torch.compile`` and under any dispatch mode (fake tensors,
``make_fx``, op counting), which must see one op per launch. In eager mode a fused step
costs about 17 us of host time on a 2-core CPU, the registered ops about 120 us
(``benchmarks/profiles/host_time_per_step.py``, kernel launches stubbed).
Per-call integers (row count, layer, ...) are ``do_not_specialize``: otherwise Triton
compiles a new variant whenever one of them equals 1 or is a multiple of 16. Block sizes
are powers of two chosen from the row count and H by comparison only
(:func:`~earlyexit_kernels.backends.triton_kernels._common.pow2_bucket`), so the launchers
also run traced with dynamic shapes, where those sizes are SymInts.
Every launch runs on the device of its tensors (Triton launches on the current device).

Numerics: fp32 accumulation for fp32/fp16/bf16 inputs (the head's products:
:mod:`.exit_head`). Under autocast the head runs in the autocast dtype, as ``F.linear``
does in the reference.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from earlyexit_kernels.backends import policy_lowering
from earlyexit_kernels.backends.policy_lowering import PolicyKind, RuleFlag
from earlyexit_kernels.backends.triton_kernels import exit_step_ops  # noqa: F401  (registers the ops)
from earlyexit_kernels.backends.triton_kernels._common import new_empty, use_ops
from earlyexit_kernels.backends.triton_kernels.exit_decide import (
    _SLOTS,
    DACT_CODE,
    F_LOGITS,
    F_NORMALIZED,
    F_PARTIALS,
    F_RETURNED,
    F_WRITE_BACK,
    QEXIT,
    _run_decide,
)
from earlyexit_kernels.backends.triton_kernels.exit_head import _run_head
from earlyexit_kernels.backends.write_back import WriteBack
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = [
    "exit_step",
    "head_exit_step",
    "exit_step_write_back",
    "head_exit_step_write_back",
]

State = dict[str, torch.Tensor]

# Looked up at each call, so that a benchmark can route eager calls through the ops.
_use_ops = use_ops


def _direct(kernel):
    return kernel


# ----------------------------------------------------------------------------- wrappers


class _Lowered(NamedTuple):
    """A policy as the decision kernel takes it (per layer: ``fa[layer - 1]``, ``fb[layer - 1]``)."""

    code: int
    flags: int
    fa: tuple[float, ...]
    fb: tuple[float, ...]
    int_param: int
    aux_key: str | None


def _per_layer(value, num_layers: int) -> tuple[float, ...]:
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return (float(value),) * max(num_layers, 1)


@functools.lru_cache(maxsize=256)
def _lower(policy: ExitPolicy, num_layers: int) -> _Lowered:
    low = policy_lowering.lower(policy)
    # fa: the per-layer threshold where the rule has one, else its scalar (q, regression_threshold);
    # fb: the temperature, or ln C filled in at the call for a normalized entropy.
    fa = low.threshold if low.kind in (PolicyKind.ENTROPY, PolicyKind.MAXPROB) else low.scalar
    fb = low.temperature if low.flags & RuleFlag.TEMPERATURE else 0.0
    return _Lowered(
        int(low.kind),
        int(low.flags),
        _per_layer(fa, num_layers),
        _per_layer(fb, num_layers),
        low.int_param,
        low.aux_key,
    )


def _state_slot(state: State, key: str, dtype: torch.dtype, wide: bool, n: int) -> torch.Tensor:
    try:
        t = state[key]
    except KeyError:
        raise ValueError(f"the policy's state has no {key!r}") from None
    if t.shape[0] != n or t.dim() != (2 if wide else 1):
        raise ValueError(
            f"state {key!r} must have {n} rows{' of one value per label' if wide else ''}, got {list(t.shape)}"
        )
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _decide(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    src: torch.Tensor,
    head_bias: torch.Tensor | None,
    halting_logit: torch.Tensor | None,
    state: State,
    flags: int,
    target: WriteBack | None = None,
):
    """One decision launch: ``(exits, returned, logits, new state, order, stats)``, each None
    where the flags do not ask for it. With ``target`` it writes back and orders the survivors."""
    low = _lower(policy, num_layers)
    code = low.code
    n, num_labels = src.shape[-2], src.shape[-1]
    fa, fb = low.fa[layer - 1], low.fb[layer - 1]
    if low.flags & F_NORMALIZED:
        fb = math.log(num_labels) if num_labels > 1 else 1.0
    flags |= low.flags
    slots = _SLOTS.get(code)
    s0 = s1 = None
    if slots is not None:
        s0 = _state_slot(state, *slots[0], n)
        s1 = _state_slot(state, *slots[1], n)
    halting = None
    if code == QEXIT or code == DACT_CODE:
        if halting_logit is None:
            raise ValueError(f"{type(policy).__name__} needs a halting logit")
        halting = halting_logit
    aux = None
    if low.aux_key is not None:
        aux = state[low.aux_key]
        if aux.shape[0] != n:
            raise ValueError(f"state {low.aux_key!r} must have {n} rows, got {list(aux.shape)}")
    if target is not None:
        flags |= F_WRITE_BACK
        rows, runs, extents, out_logits, out_exit, out_runs = target
    else:
        rows = runs = extents = out_logits = out_exit = out_runs = None
    args = (src, head_bias, halting, s0, s1, aux, rows, runs, extents)
    scalars = (code, layer, num_layers, fa, fb, low.int_param, flags)
    if _use_ops():
        if target is None:
            out_logits = new_empty((0, num_labels), torch.float32, src.device)
            out_exit = new_empty((0,), torch.int64, src.device)
            out_runs = new_empty((0,), torch.int64, src.device)
        outs = torch.ops.earlyexit.exit_decide(*args, out_logits, out_exit, out_runs, *scalars)
    else:
        outs = _run_decide(_direct, *args, out_logits, out_exit, out_runs, *scalars, False)
    exits, returned, logits, s0_out, s1_out, order, stats = outs
    new_state = dict(state)
    if slots is not None:
        new_state[slots[0][0]] = s0_out
        new_state[slots[1][0]] = s1_out
    if not flags & F_RETURNED:
        returned = None
    if not flags & F_LOGITS:
        logits = None
    return exits, returned, logits, new_state, order, stats


def exit_step_write_back(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
    target: WriteBack,
) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`earlyexit_kernels.backends.write_back.exit_step_write_back`: one launch.

    ``order[:count]`` are the rows that stay, in increasing order; ``order[count:]`` are the
    exiting rows in decreasing order, so every element is defined.
    """
    exits, _, _, state, order, stats = _decide(policy, layer, num_layers, logits, None, halting_logit, state, 0, target)
    return exits, state, order, stats


def exit_step(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Triton version of :func:`earlyexit_kernels.methods.exit_rules.exit_step` (same arguments and results)."""
    exits, returned, _, state, _, _ = _decide(policy, layer, num_layers, logits, None, halting_logit, state, F_RETURNED)
    return exits, returned, state


def _same_dtype(what: str, *tensors):
    """``tensors`` in one dtype: under autocast the autocast dtype (what ``F.linear`` computes in
    there, as in the reference), otherwise they must already share one."""
    if torch._C._is_any_autocast_enabled():
        device_type = tensors[0].device.type
        if torch.is_autocast_enabled(device_type):  # autocast leaves float64 alone
            fast = torch.get_autocast_dtype(device_type)
            tensors = tuple(t if t.dtype == fast or t.dtype == torch.float64 else t.to(fast) for t in tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dtype:
            raise TypeError(
                f"{what}: hidden states and head weights must share one dtype, got "
                f"{sorted({str(x.dtype) for x in tensors})}"
            )
    return tensors


def _head(
    target, policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn
):
    """Both launches; with ``target`` the decision also writes back and orders the survivors."""
    cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias = _same_dtype(
        "head_exit_step", cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias
    )
    want_pooled = halting_fn is not None or "prev_pooled" in state
    if _use_ops():
        zpart, pooled = torch.ops.earlyexit.exit_head(cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled)
    else:
        zpart, pooled = _run_head(_direct, cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled, False)
    halting = halting_fn(pooled, state.get("prev_pooled")) if halting_fn is not None else None
    flags = F_PARTIALS if target is not None else F_PARTIALS | F_RETURNED | F_LOGITS
    exits, returned, logits, state, order, stats = _decide(
        policy, layer, num_layers, zpart, head_bias, halting, state, flags, target
    )
    if "prev_pooled" in state:
        state["prev_pooled"] = pooled
    return exits, returned, logits, halting, state, order, stats


def head_exit_step(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    state: State,
    halting_fn=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, State]:
    """Triton version of :func:`earlyexit_kernels.methods.exit_rules.head_exit_step` (same arguments and results)."""
    exits, returned, logits, halting, state, _, _ = _head(
        None,
        policy,
        layer,
        num_layers,
        cls_hidden,
        pooler_weight,
        pooler_bias,
        head_weight,
        head_bias,
        state,
        halting_fn,
    )
    return exits, returned, logits, halting, state


def head_exit_step_write_back(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    state: State,
    halting_fn,
    target: WriteBack,
) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`earlyexit_kernels.backends.write_back.head_exit_step_write_back`: two launches."""
    exits, _, _, _, state, order, stats = _head(
        target,
        policy,
        layer,
        num_layers,
        cls_hidden,
        pooler_weight,
        pooler_bias,
        head_weight,
        head_bias,
        state,
        halting_fn,
    )
    return exits, state, order, stats
