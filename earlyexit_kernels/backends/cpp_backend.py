"""The C++ backend (``"cpp"``, CPU) and the CUDA backend (``"cuda"``): ``earlyexit_kernels._C``.

The compiled extension defines ``torch.ops.earlyexit.cpp_head``, ``cpp_exit_step``,
``cpp_head_exit_step`` and ``cpp_compact`` (schemas in ``csrc/bindings.cpp``). This
module lowers an exit policy to what the kernels take (a kind, flags, two scalars and a
per-layer float32 tensor ``[2, L]`` of thresholds and temperatures), wraps the ops with
exactly the signatures of :func:`earlyexit_kernels.methods.exit_rules.exit_step`,
:func:`earlyexit_kernels.methods.exit_rules.head_exit_step` and
:func:`earlyexit_kernels.backends.compaction.compact`, and registers the backends.

When ``_C`` is missing or cannot be loaded (not built, built for another torch), it
warns once with the reason and marks ``"cpp"`` and ``"cuda"`` unavailable; the package
keeps working with the other backends.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from earlyexit_kernels.backends import compaction, cpp_op_shapes, policy_lowering, pooled_head
from earlyexit_kernels.backends import registry as backend_registry
from earlyexit_kernels.backends.cpp_op_shapes import FLAG_SURVIVORS
from earlyexit_kernels.backends.reference_rules import runs_on_reference
from earlyexit_kernels.backends.write_back import WriteBack
from earlyexit_kernels.methods.policies import ExitPolicy

__all__ = [
    "exit_step",
    "head_exit_step",
    "exit_step_write_back",
    "head_exit_step_write_back",
    "compact",
    "lower_policy",
    "LOAD_ERROR",
]


@dataclass(frozen=True)
class CppPolicyArgs:
    """What the C++ and CUDA ops take for one policy on a model of ``num_layers`` layers."""

    kind: int
    flags: int
    int_param: int
    scalar: float
    per_layer: torch.Tensor  # float32 [2, L] on the CPU: threshold, temperature per layer
    state_in: tuple[str, ...]
    state_out: tuple[str, ...]


def _per_layer_row(value, width: int) -> list[float]:
    if value is None:
        return [1.0] * width
    if isinstance(value, tuple):
        return list(value) + [float("nan")] * (width - len(value))
    return [float(value)] * width


@functools.lru_cache(maxsize=128)
def lower_policy(policy: ExitPolicy, num_layers: int) -> CppPolicyArgs:
    """``policy`` (lowered by :mod:`~earlyexit_kernels.backends.policy_lowering`) laid out for the ops."""
    low = policy_lowering.lower(policy)
    threshold, temperature = low.threshold, low.temperature
    width = max(num_layers, *(len(v) for v in (threshold, temperature) if isinstance(v, tuple)), 1)
    # float32 like the reference's comparison of a float32 tensor with a Python float.
    per_layer = torch.tensor(
        [_per_layer_row(threshold, width), _per_layer_row(temperature, width)], dtype=torch.float32
    )
    # The ops read a stochastic QExit's uniforms as one more state input.
    state_in = (*low.state_in, "uniforms") if low.aux_key == "uniforms" else low.state_in
    return CppPolicyArgs(int(low.kind), int(low.flags), low.int_param, low.scalar, per_layer, state_in, low.state_out)


def _updated(state: dict, lowered: CppPolicyArgs, state0: torch.Tensor, state1: torch.Tensor) -> dict:
    """The state with the op's outputs ``state0``, ``state1`` under the policy's keys."""
    state = dict(state)
    state.update(zip(lowered.state_out, (state0, state1)))
    return state


def _rule_args(lowered: CppPolicyArgs, layer: int, num_layers: int, target: WriteBack | None) -> tuple:
    """The op arguments after the state list; with ``target`` the survivors and the write-back."""
    flags = lowered.flags if target is None else lowered.flags | FLAG_SURVIVORS
    args = (lowered.kind, flags, layer, num_layers, lowered.int_param, lowered.scalar, lowered.per_layer)
    if target is None:
        return args
    return (*args, target.rows, target.runs, target.logits, target.exit_layer, target.layers_run)


def _survivor_stats(exits: torch.Tensor, count: torch.Tensor, extents: torch.Tensor | None) -> torch.Tensor:
    """``(count, longest extent of a staying row)`` as in :func:`earlyexit_kernels.backends.write_back.write_back`;
    ``(count,)`` alone, a view that launches nothing, where there are no extents: nobody reads a longest
    there (the graphed step's fixed buckets pass none)."""
    count = count.reshape(1)
    if extents is None:
        return count
    if exits.numel() == 0:
        return torch.nn.functional.pad(count, (0, 1))
    return torch.cat([count, torch.where(exits, 0, extents).amax().reshape(1)])


def _exit_step(policy, layer, num_layers, logits, halting_logit, state, target):
    lowered = lower_policy(policy, num_layers)
    exits, returned, state0, state1, order, count = torch.ops.earlyexit.cpp_exit_step(
        logits, halting_logit, [state[k] for k in lowered.state_in], *_rule_args(lowered, layer, num_layers, target)
    )
    return exits, returned, _updated(state, lowered, state0, state1), order, count


def exit_step(policy, layer, num_layers, logits, halting_logit, state):
    """:func:`earlyexit_kernels.methods.exit_rules.exit_step` on the C++/CUDA kernels."""
    exits, returned, state, _, _ = _exit_step(policy, layer, num_layers, logits, halting_logit, state, None)
    return exits, returned, state


def exit_step_write_back(policy, layer, num_layers, logits, halting_logit, state, target):
    """:func:`earlyexit_kernels.backends.write_back.exit_step_write_back` on the C++/CUDA kernels (one op)."""
    exits, _, state, order, count = _exit_step(policy, layer, num_layers, logits, halting_logit, state, target)
    return exits, state, order, _survivor_stats(exits, count, target.extents)


# The CUDA head's block layout (csrc/cuda/exit_step.cu, launchers.h): kRows rows staged whole.
CUDA_HEAD_ROWS, CUDA_HEAD_TILE = 8, 64


def cuda_head_shared_bytes(hidden: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of one CUDA head block: ``kRows`` [CLS] rows of ``hidden``
    features (padded to 16 bytes) and their pooled values in one feature tile."""
    size = torch.empty((), dtype=dtype).element_size()
    return -(-CUDA_HEAD_ROWS * hidden * size // 16) * 16 + CUDA_HEAD_ROWS * CUDA_HEAD_TILE * size


@functools.lru_cache(maxsize=16)
def _optin_shared_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def cuda_head_fits(hidden: int, dtype: torch.dtype, optin_bytes: int) -> bool:
    """Whether the CUDA head can run for ``hidden`` on a GPU whose blocks may use ``optin_bytes``
    of shared memory (an A100: 163 KiB, so fp32 up to H = 5152; an H100: 227 KiB, H = 7200)."""
    return cuda_head_shared_bytes(hidden, dtype) <= optin_bytes


def _torch_head(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias):
    """``(pooled, logits)`` of the default head in PyTorch (the reference's computation)."""
    pooled = torch.tanh(torch.nn.functional.linear(cls_hidden, pooler_weight, pooler_bias))
    return pooled, torch.nn.functional.linear(pooled, head_weight, head_bias)


# W_p transposed per pooler weight, for the CPU's float32 head; packed again when the weight
# changes in place (its version counter) or is swapped for other storage.
_TRANSPOSED_POOLER = WeakIdKeyDictionary()


def transposed_pooler(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t().contiguous()`` [H_in, H_out] in float32, computed once per weight and version
    (every call for an inference tensor, which has no version to tell an in-place update by)."""
    return _cached(_TRANSPOSED_POOLER, weight, lambda w: w.t().float().contiguous())


_FLOAT32_COPIES = WeakIdKeyDictionary()


def float32_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 (itself when it is), made once per tensor and version."""
    if tensor.dtype == torch.float32:
        return tensor.detach()
    return _cached(_FLOAT32_COPIES, tensor, lambda t: t.float().contiguous())


def _cached(cache: WeakIdKeyDictionary, tensor: torch.Tensor, make) -> torch.Tensor:
    if tensor.is_inference():
        return make(tensor)
    key = (tensor._version, tensor.data_ptr())
    entry = cache.get(tensor)
    if entry is None or entry[0] != key:
        entry = (key, make(tensor.detach()))
        cache[tensor] = entry
    return entry[1]


# Rows x H^2 x threads up to which the C++ head (one thread) is used rather than torch's GEMM
# (every thread) on the CPU. Right after a layer, at 2 threads, it is ahead up to 256 x 128^2,
# even to 10% behind at 32 x 384^2, 1.2-3.3x behind from 128 x 384^2 and 32 x 768^2; at 1 thread
# 20% ahead at 32 x 384^2 (benchmarks/results/intel_xeon/exit_head_in_situ_cpu.md).
CPU_HEAD_MAX_WORK = 8 * 2**20


def _cpu_head_rows(hidden: int) -> int:
    """The most rows the C++ head takes at hidden size ``hidden`` with torch's current threads."""
    return CPU_HEAD_MAX_WORK // (hidden * hidden * torch.get_num_threads())


def _cpu_head_in_cpp(cls_hidden: torch.Tensor, halting_fn) -> bool:
    """Whether the CPU head runs as the float32 C++ kernel with the rule (one op; csrc/cpu/pooler_head_cpu.cpp)."""
    return (
        halting_fn is None
        and cls_hidden.device.type == "cpu"
        and cls_hidden.dtype == torch.float32
        and cls_hidden.shape[0] <= _cpu_head_rows(cls_hidden.shape[1])
        and not torch.compiler.is_compiling()
        and not torch.is_grad_enabled()
    )


def _head_exit_step(
    target, policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn
):
    """The head and the rule; with ``target`` the rule also writes back and lists the survivors."""
    lowered = lower_policy(policy, num_layers)
    state_list = [state[k] for k in lowered.state_in]
    rule_args = _rule_args(lowered, layer, num_layers, target)
    if _cpu_head_in_cpp(cls_hidden, halting_fn):
        exits, returned, logits, pooled, state0, state1, order, count = torch.ops.earlyexit.cpp_packed_head_exit_step(
            cls_hidden,
            transposed_pooler(pooler_weight),
            pooler_bias,
            head_weight,
            head_bias,
            None,
            state_list,
            *rule_args,
        )
        halting = None
    elif not cls_hidden.is_cuda or not cuda_head_fits(
        cls_hidden.shape[1], cls_hidden.dtype, _optin_shared_bytes(cls_hidden.device)
    ):
        # On the CPU with a halting head, or in float16/bfloat16, torch's GEMM runs the head
        # (it beats the generic C++ head's dot products from about 32 rows up) and C++ the rule.
        # On a GPU whose shared memory cannot stage the CUDA head's rows (fp32 with a large H
        # on an A100), the head runs in PyTorch too instead of failing to launch.
        pooled, logits = _torch_head(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias)
        halting = halting_fn(pooled, state.get("prev_pooled")) if halting_fn is not None else None
        exits, returned, state0, state1, order, count = torch.ops.earlyexit.cpp_exit_step(
            logits, halting, state_list, *rule_args
        )
    elif halting_fn is not None:
        pooled, logits = torch.ops.earlyexit.cpp_head(cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias)
        halting = halting_fn(pooled, state.get("prev_pooled"))
        exits, returned, state0, state1, order, count = torch.ops.earlyexit.cpp_exit_step(
            logits, halting, state_list, *rule_args
        )
    else:
        halting = None
        exits, returned, logits, pooled, state0, state1, order, count = torch.ops.earlyexit.cpp_head_exit_step(
            cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, None, state_list, *rule_args
        )
    state = _updated(state, lowered, state0, state1)
    if "prev_pooled" in state:
        state["prev_pooled"] = pooled
    return exits, returned, logits, halting, state, order, count


def head_exit_step(
    policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn=None
):
    """:func:`earlyexit_kernels.methods.exit_rules.head_exit_step` on the C++/CUDA kernels.

    Without a halting head the head and the rule run as one op: on CUDA, and on the CPU in
    float32 (the pooler weight transposed once, :func:`transposed_pooler`). With one, the
    head gives the pooled vector the halting head (a Python module) reads, then the rule
    runs; on the CPU that head, and float16/bfloat16 heads, are torch's GEMM.
    """
    weights = (pooler_weight, pooler_bias, head_weight, head_bias)
    return _head_exit_step(None, policy, layer, num_layers, cls_hidden, *weights, state, halting_fn)[:5]


def prepare_head_exit_step(policy, layer, num_layers, pooler_weight, pooler_bias, head_weight, head_bias):
    """:func:`head_exit_step` of one layer on the CPU in float32 with its weights and rule made
    ready (the pooler weight transposed, the policy lowered): ``step(cls_hidden [n, H], state)
    -> (exits [n], returned [n, C], state)``, through torch's GEMM past ``CPU_HEAD_MAX_WORK`` (rows x H^2 x threads).
    None on other devices and dtypes, and for the policies that run the reference step.
    Weights changed after this are not seen."""
    if runs_on_reference(policy) or pooler_weight.device.type != "cpu" or pooler_weight.dtype != torch.float32:
        return None
    lowered = lower_policy(policy, num_layers)
    weights = (transposed_pooler(pooler_weight), pooler_bias.detach(), head_weight.detach(), head_bias.detach())
    rule_args = _rule_args(lowered, layer, num_layers, None)
    op = torch.ops.earlyexit.cpp_packed_head_exit_step.default
    hidden = pooler_weight.shape[0]

    def step(cls_hidden, state):
        if cls_hidden.shape[0] > _cpu_head_rows(hidden):  # torch's GEMM on every thread does better
            exits, returned, _, _, state = head_exit_step(
                policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state
            )
            return exits, returned, state
        exits, returned, _, _, state0, state1, _, _ = op(
            cls_hidden, *weights, None, [state[k] for k in lowered.state_in], *rule_args
        )
        return exits, returned, _updated(state, lowered, state0, state1)

    return step


def head_exit_step_write_back(
    policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn, target
):
    """:func:`earlyexit_kernels.backends.write_back.head_exit_step_write_back` on the C++/CUDA kernels."""
    weights = (pooler_weight, pooler_bias, head_weight, head_bias)
    exits, _, _, _, state, order, count = _head_exit_step(
        target, policy, layer, num_layers, cls_hidden, *weights, state, halting_fn
    )
    return exits, state, order, _survivor_stats(exits, count, target.extents)


_POOLING_CODES = {"cls": 0, "mean": 1}
_ACTIVATION_CODES = {"tanh": 0, "gelu": 1}


def _pooled_head_in_cpp(hidden: torch.Tensor, head) -> bool:
    """Whether the fused C++ step (pooling, head and rule; csrc/cpu/pooled_head_step_cpu.cpp)
    runs ``head`` on ``hidden`` [n, S, H]: float32 or bfloat16 (the head in the same dtype) on the
    CPU at inference, up to ``CPU_POOLED_HEAD_MAX_WORK``; else the pooling and head run in PyTorch
    and the rule in C++. Under autocast it runs in the hidden states' dtype, as the fused heads
    of both engines always have (the model's own classifier at the last layer runs autocast's)."""
    return _cpu_call_fits(hidden, head.dense_weight.numel()) and all(
        t.dtype == hidden.dtype and t.device.type == "cpu" for t in head.tensors
    )


def _cpu_call_fits(hidden: torch.Tensor, work: int) -> bool:
    """The call's part of :func:`_pooled_head_in_cpp`: ``hidden`` [n, S, H] float32 or bfloat16 on the CPU at
    inference, with n x ``work`` (the head's H x M) x threads up to ``CPU_POOLED_HEAD_MAX_WORK``."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype in (torch.float32, torch.bfloat16)
        and hidden.shape[0] * work * torch.get_num_threads() <= CPU_POOLED_HEAD_MAX_WORK
        and not torch.is_grad_enabled()
    )


def _pooled_head_on_gpu(hidden: torch.Tensor, head) -> bool:
    """Whether the CUDA kernels run the whole step (csrc/cuda/pool_norm.cu, then the head and the
    rule of exit_step.cu): the head's tensors in the hidden states' dtype and on their device, at
    inference, with rows the head block can stage in shared memory (:func:`cuda_head_fits`)."""
    hidden_size = hidden.shape[2]
    return (
        WITH_CUDA
        and hidden.is_cuda
        and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.dtype == hidden.dtype and t.device == hidden.device for t in head.tensors)
        and not torch.is_grad_enabled()
        and cuda_head_fits(hidden_size, hidden.dtype, _optin_shared_bytes(hidden.device))
        and 4 * hidden_size <= _optin_shared_bytes(hidden.device)  # the pooling block's float32 sums
    )


def _as_op_takes(tensor: torch.Tensor | None, transpose: bool = False) -> torch.Tensor | None:
    """A weight as the fused op takes it: float32, transposed for its first Linear; made once per
    tensor and version, or in the graph under torch.compile (which cannot key a cache on storage)."""
    if tensor is None:
        return None
    if torch.compiler.is_compiling():
        return (tensor.t() if transpose else tensor).float().contiguous()
    return transposed_pooler(tensor) if transpose else float32_copy(tensor)


# Rows x H x M x threads up to which the fused C++ step (one thread) runs; past it the pooling and
# the head run in PyTorch (its GEMM on every thread) and the rule in C++. Twice the packed head's
# measured limit, since the step also saves the masked mean's copy: not swept on its own (at 32 rows
# x H = M = 384 x 2 threads, inside it, the step took 1.23 ms against PyTorch's 2.36 ms,
# benchmarks/archive/exit_head_cost.py on an AMD EPYC).
CPU_POOLED_HEAD_MAX_WORK = 2 * CPU_HEAD_MAX_WORK


def _pooled_head_op(policy, layer, num_layers, hidden, mask, head, state, target):
    lowered = lower_policy(policy, num_layers)
    if _pooled_head_on_gpu(hidden, head):
        norm = (head.norm_weight, head.norm_bias)
        # The CUDA kernels take the weights as they are: dense_weight.t() is a view, the kernel
        # reads it back as the contiguous [M, H] it is.
        weights = (head.dense_weight.t(), head.dense_bias, _ACTIVATION_CODES[head.activation])
        exits, returned, logits, _, state0, state1, order, count = torch.ops.earlyexit.cpp_pooled_head_exit_step(
            hidden,
            mask if head.pooling == "mean" else None,
            _POOLING_CODES[head.pooling],
            *norm,
            head.norm_eps,
            *weights,
            head.out_weight,
            head.out_bias,
            None,
            [state[k] for k in lowered.state_in],
            *_rule_args(lowered, layer, num_layers, target),
        )
        return exits, returned, logits, _updated(state, lowered, state0, state1), order, count
    if not _pooled_head_in_cpp(hidden, head):
        logits, _ = pooled_head.pooled_head_logits(hidden, mask, head)
        exits, returned, state0, state1, order, count = torch.ops.earlyexit.cpp_exit_step(
            logits, None, [state[k] for k in lowered.state_in], *_rule_args(lowered, layer, num_layers, target)
        )
        return exits, returned, logits, _updated(state, lowered, state0, state1), order, count
    exits, returned, logits, _, state0, state1, order, count = torch.ops.earlyexit.cpp_pooled_head_exit_step(
        hidden,
        mask if head.pooling == "mean" else None,
        *_cpu_op_head(head),
        [state[k] for k in lowered.state_in],
        *_rule_args(lowered, layer, num_layers, target),
    )
    return exits, returned, logits, _updated(state, lowered, state0, state1), order, count


def _cpu_op_head(head) -> tuple:
    """The head's arguments of the fused op on the CPU, between the mask and the state: its pooling, the
    weights as the op takes them (float32, the first Linear transposed), its activation, no halting head."""
    return (
        _POOLING_CODES[head.pooling],
        _as_op_takes(head.norm_weight),
        _as_op_takes(head.norm_bias),
        head.norm_eps,
        _as_op_takes(head.dense_weight, transpose=True),
        _as_op_takes(head.dense_bias),
        _ACTIVATION_CODES[head.activation],
        _as_op_takes(head.out_weight),
        _as_op_takes(head.out_bias),
        None,
    )


def pooled_head_exit_step(policy, layer, num_layers, hidden, mask, head, state):
    """:func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step` in one C++ op (float32 and
    bfloat16 on the CPU; float32, float16 and bfloat16 on a GPU with the CUDA kernels)."""
    return _pooled_head_op(policy, layer, num_layers, hidden, mask, head, state, None)[:4]


def prepare_pooled_head_exit_step(policy, layer, num_layers, head):
    """:func:`pooled_head_exit_step` of one layer with its weights and rule made ready (the weights as the op
    takes them, the policy lowered): ``step(hidden [n, S, H], mask [n, S] or None, state) -> (exits, returned,
    state)``, for an engine that calls the same layer's head at every layer call. The fused C++ step where it runs
    the call (:func:`_pooled_head_in_cpp`), else :func:`pooled_head_exit_step`. None on a GPU, for heads whose
    tensors differ in dtype, and for the policies that run the reference step. Weights changed after this are
    not seen."""
    dtype = head.dense_weight.dtype
    if (
        runs_on_reference(policy)
        or dtype not in (torch.float32, torch.bfloat16)
        or any(t.dtype != dtype or t.device.type != "cpu" for t in head.tensors)
    ):
        return None
    lowered = lower_policy(policy, num_layers)
    weights = _cpu_op_head(head)
    rule_args = _rule_args(lowered, layer, num_layers, None)
    mean, work = head.pooling == "mean", head.dense_weight.numel()  # H x M
    op = torch.ops.earlyexit.cpp_pooled_head_exit_step.default

    def step(hidden, mask, state):
        if hidden.dtype != dtype or not _cpu_call_fits(hidden, work):  # the head's tensors were checked above
            exits, returned, _, state = pooled_head_exit_step(policy, layer, num_layers, hidden, mask, head, state)
            return exits, returned, state
        exits, returned, _, _, state0, state1, _, _ = op(
            hidden, mask if mean else None, *weights, [state[k] for k in lowered.state_in], *rule_args
        )
        return exits, returned, _updated(state, lowered, state0, state1)

    return step


def pooled_head_exit_step_write_back(policy, layer, num_layers, hidden, mask, head, state, target):
    """:func:`earlyexit_kernels.backends.pooled_head.pooled_head_exit_step_write_back` in one C++ op (float32)."""
    exits, _, _, state, order, count = _pooled_head_op(policy, layer, num_layers, hidden, mask, head, state, target)
    return exits, state, order, _survivor_stats(exits, count, target.extents)


def gather_survivors(order, exits, rows, dead, next_rows, count, sources, targets, host_count=None):
    """:func:`earlyexit_kernels.backends.survivor_gather.gather_survivors` in one C++/CUDA op."""
    torch.ops.earlyexit.cpp_gather_survivors(
        order, exits, rows, int(dead), next_rows, count, list(sources), list(targets), host_count
    )


def compact(hidden, mask, index, seq_len):
    """:func:`earlyexit_kernels.backends.compaction.compact` on the C++/CUDA gather kernels.

    Under ``torch.compile`` the gather is traced as PyTorch ops instead: the op's ``int`` length
    would make Dynamo compile one graph per trimmed length."""
    if torch.compiler.is_compiling():
        return compaction.compact(hidden, mask, index, seq_len)
    out, out_mask = torch.ops.earlyexit.cpp_compact(hidden, mask, index, int(seq_len))
    return out, (out_mask if mask is not None else None)


# ---------------------------------------------------------------------------------------
# Loading and registration.

_OPS = {
    "exit_step": exit_step,
    "compact": compact,
    "head_exit_step": head_exit_step,
    "exit_step_write_back": exit_step_write_back,
    "head_exit_step_write_back": head_exit_step_write_back,
    "prepare_head_exit_step": prepare_head_exit_step,
    "pooled_head_exit_step": pooled_head_exit_step,
    "pooled_head_exit_step_write_back": pooled_head_exit_step_write_back,
    "prepare_pooled_head_exit_step": prepare_pooled_head_exit_step,
    "gather_survivors": gather_survivors,
}
LOAD_ERROR: str | None = None
WITH_CUDA = False


def _load() -> str | None:
    """Import _C and check it; None on success, otherwise the reason it cannot be used."""
    global WITH_CUDA
    try:
        ext = importlib.import_module("earlyexit_kernels._C")
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "earlyexit_kernels._C":
            return (
                "the C++ extension earlyexit_kernels._C is not built "
                "(install with `pip install --no-build-isolation -e .` where torch is installed)"
            )
        return f"the C++ extension earlyexit_kernels._C failed to load: {err}"
    except OSError as err:
        return f"the C++ extension earlyexit_kernels._C failed to load: {err}"
    built_for = getattr(ext, "TORCH_VERSION", "unknown")
    if built_for != torch.__version__:
        return (
            f"the C++ extension earlyexit_kernels._C was built for torch {built_for} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation -e .`"
        )
    if not hasattr(torch.ops.earlyexit, "cpp_exit_step"):
        return "the C++ extension earlyexit_kernels._C loaded but did not register its operators"
    if not hasattr(torch.ops.earlyexit, "cpp_packed_head_exit_step"):
        return (
            "the C++ extension earlyexit_kernels._C is from an older build (no cpp_packed_head_exit_step); "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
    for op in ("cpp_pool_gather", "cpp_bert_layer", "cpp_pooled_head_exit_step", "cpp_gather_survivors"):
        if not hasattr(torch.ops.earlyexit, op):
            return (
                f"the C++ extension earlyexit_kernels._C is from an older build (no {op}); "
                "rebuild with `pip install --no-build-isolation -e .`"
            )
    WITH_CUDA = bool(getattr(ext, "WITH_CUDA", 0))
    forced = os.environ.get("EARLYEXIT_CPU_ISA")
    if forced is not None and forced != getattr(ext, "CPU_HEAD_ISA", None):
        warnings.warn(
            f"EARLYEXIT_CPU_ISA={forced!r} is not a version of the CPU head this CPU runs "
            f"(portable, avx2_fma, avx512); running {getattr(ext, 'CPU_HEAD_ISA', 'unknown')!r}",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def _register() -> None:
    global LOAD_ERROR
    LOAD_ERROR = _load()
    if LOAD_ERROR is not None:
        warnings.warn(f"earlyexit_kernels: C++ backend unavailable: {LOAD_ERROR}", RuntimeWarning, stacklevel=2)
        backend_registry.mark_unavailable("cpp", LOAD_ERROR)
        backend_registry.mark_unavailable("cuda", LOAD_ERROR)
        return
    cpp_op_shapes.register()
    backend_registry.register_backend(backend_registry.Backend("cpp", devices=("cpu",), **_OPS))
    if not WITH_CUDA:
        backend_registry.mark_unavailable(
            "cuda", "earlyexit_kernels._C was built without the CUDA kernels (no CUDA torch or no nvcc at build time)"
        )
    elif not torch.cuda.is_available():
        backend_registry.mark_unavailable("cuda", "the CUDA kernels are built but no CUDA GPU is available")
    else:
        backend = backend_registry.Backend("cuda", devices=("cuda",), pooled_head_devices=("cuda",), **_OPS)
        backend_registry.register_backend(backend)


_register()
