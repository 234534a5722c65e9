"""Fused exit step in Triton: default head, softmax, every policy's criterion and state update.

Two launches per layer at most:

1. ``_head_kernel`` (only for :func:`head_exit_step`): for the active rows it reads
   the [CLS] row of each sequence through a strided ``[n, H]`` view and computes
   ``pooled = tanh(W_p h + b_p)`` (fp32 accumulation) and, in the same program, the
   partial logits ``pooled[:, tile] @ W_i[:, tile]^T`` of its column tile of
   ``pooled``. Partials go to a small fp32 buffer ``[T, n, C]`` (no atomics, so the
   result does not depend on scheduling).
2. ``_decide_kernel``: sums the partials, adds ``b_i``, rounds the logits to the
   model dtype (what :func:`earlyexit_kernels.exit_rules.exit_step` receives), and
   applies the policy: softmax, entropy / max-probability / patience / Q-exit /
   voting / DACT / schedule, non-finite handling, forced exit at the last layer,
   the new state and, optionally, the stable survivor index and count.

For QExit and DACT the halting head (an arbitrary small MLP) runs in PyTorch between
the two launches: ``halting_fn(pooled, state.get("prev_pooled"))``.

:func:`exit_step` and :func:`head_exit_step` have the signatures and return
conventions of :func:`earlyexit_kernels.exit_rules.exit_step` and
:func:`earlyexit_kernels.exit_rules.head_exit_step`. Both are registered with
``torch.library`` as ``earlyexit::exit_head`` and ``earlyexit::exit_decide``.
No host sync happens inside: every decision stays on the device.

Numerics: fp32 accumulation for fp32/fp16/bf16 inputs. fp32 inputs use IEEE fp32
products (``input_precision="ieee"``, no TF32). Under the Triton interpreter bf16
tiles are widened to fp32 before ``tl.dot`` because the interpreter's ``dot`` treats
bf16 as integers; the products of bf16 values are exact in fp32, so this changes
nothing but the operand type. ``pooled`` is rounded to the input dtype before the
second product, as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..policies import DACT, Entropy, ExitPolicy, MaxProb, Patience, QExit, Scheduled, SkipGates, Voting, layer_value
from ..write_back import WriteBack
from ._common import interpreting, new_empty, next_pow2

__all__ = [
    "exit_step",
    "head_exit_step",
    "exit_step_write_back",
    "head_exit_step_write_back",
]

State = dict[str, torch.Tensor]

# Policy codes (constexpr in the kernel).
ENTROPY, MAXPROB, PATIENCE_CLS, PATIENCE_REG, QEXIT, VOTING, DACT_CODE, SCHEDULED = range(8)

_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# Tests set this to run the GPU block sizes under the interpreter too.
FORCE_GPU_BLOCKS = False


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _head_kernel(
    h_ptr,
    stride_hn,
    stride_hk,
    wp_ptr,
    stride_wpo,
    stride_wpi,
    bp_ptr,
    wi_ptr,
    stride_wic,
    stride_wik,
    pooled_ptr,
    zpart_ptr,
    n,
    H,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WRITE_POOLED: tl.constexpr,
):
    """Program (pid_m, pid_n): rows pid_m*BLOCK_M.., pooled columns pid_n*BLOCK_N.."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n
    col_ok = cols < H
    row_off = rows.to(tl.int64) * stride_hn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        x = tl.load(h_ptr + row_off[:, None] + k[None, :] * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            wp_ptr + cols[None, :] * stride_wpo + k[:, None] * stride_wpi,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    pre = acc + tl.load(bp_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pooled = _tanh(pre).to(wi_ptr.dtype.element_ty)
    if WRITE_POOLED:
        tl.store(
            pooled_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :],
            pooled,
            mask=row_ok[:, None] & col_ok[None, :],
        )

    cs = tl.arange(0, BLOCK_C)
    w2 = tl.load(
        wi_ptr + cs[None, :] * stride_wic + cols[:, None] * stride_wik,
        mask=(cs < C)[None, :] & col_ok[:, None],
        other=0.0,
    )
    if DOT_FP32:
        z = tl.dot(pooled.to(tl.float32), w2.to(tl.float32), input_precision="ieee")
    else:
        z = tl.dot(pooled, w2)
    tl.store(
        zpart_ptr + pid_n * n * C + rows[:, None] * C + cs[None, :],
        z,
        mask=row_ok[:, None] & (cs < C)[None, :],
    )


@triton.jit
def _decide_kernel(
    src_ptr,
    stride_sn,
    stride_sc,
    num_tiles,
    bias_ptr,
    logits_ptr,
    returned_ptr,
    exits_ptr,
    halt_ptr,
    stride_halt,
    f0_ptr,
    f1_ptr,
    i32_ptr,
    i64_ptr,
    vf_ptr,
    vi_ptr,
    aux_ptr,
    stride_aux_n,
    stride_aux_l,
    f0_out,
    f1_out,
    i32_out,
    i64_out,
    vf_out,
    vi_out,
    surv_ptr,
    count_ptr,
    rows_ptr,
    runs_ptr,
    ext_ptr,
    out_logits_ptr,
    stride_out_n,
    stride_out_c,
    out_exit_ptr,
    out_runs_ptr,
    batch_out,
    n,
    C,
    layer,
    threshold,
    temperature,
    log_c,
    reg_threshold,
    q,
    patience,
    min_votes,
    layers_left,
    POLICY: tl.constexpr,
    NORMALIZED: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
    FORCE_EXIT: tl.constexpr,
    SURVIVORS: tl.constexpr,
    WRITE_BACK: tl.constexpr,
    HAS_EXTENTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program walks all rows in blocks of BLOCK_M, so the survivor list is in stable order."""
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    kept = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int32), axis=0)
    dropped = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int32), axis=0)
    longest = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int64), axis=0)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < n
        m2 = r_ok[:, None] & c_ok[None, :]
        rc = rows[:, None] * C + cs[None, :]  # offsets into contiguous [n, C] buffers

        if FROM_PARTIALS:
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for t in range(0, num_tiles):
                acc += tl.load(src_ptr + t * n * C + rc, mask=m2, other=0.0)
            acc += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            lg = acc.to(logits_ptr.dtype.element_ty)
            tl.store(logits_ptr + rc, lg, mask=m2)
            z = lg.to(tl.float32)
        else:
            z = tl.load(src_ptr + rows[:, None] * stride_sn + cs[None, :] * stride_sc, mask=m2, other=0.0).to(
                tl.float32
            )

        bad = tl.where(m2 & ~(tl.abs(z) <= _FLT_MAX), 1, 0)
        finite = tl.sum(bad, axis=1) == 0
        returned = z

        if POLICY == 0 or POLICY == 1 or POLICY == 5 or POLICY == 6:
            zs = z
            if POLICY == 1:
                if HAS_TEMPERATURE:
                    zs = z / temperature
            zm = tl.where(c_ok[None, :], zs, float("-inf"))
            mx = tl.max(zm, axis=1)
            sh = zm - mx[:, None]
            e = tl.exp(sh)
            den = tl.sum(e, axis=1)

        if POLICY == 0:  # Entropy (SkipGates uses the same rule)
            logp = sh - tl.log(den)[:, None]
            p = tl.exp(logp)
            ent = -tl.sum(tl.where(c_ok[None, :], p * logp, 0.0), axis=1)
            if NORMALIZED:
                ent = ent / log_c
            exits = finite & (ent < threshold)
        elif POLICY == 1:  # MaxProb
            max_p = 1.0 / den
            exits = finite & (max_p >= threshold)
        elif POLICY == 2:  # Patience, classification
            zm = tl.where(c_ok[None, :], z, float("-inf"))
            pred = tl.argmax(zm, axis=1).to(tl.int64)
            pred = tl.where(finite, pred, -1)
            prev = tl.load(i64_ptr + rows, mask=r_ok, other=-1)
            agrees = (pred == prev) & finite
            counter = tl.load(i32_ptr + rows, mask=r_ok, other=0)
            counter = tl.where(agrees, counter + 1, 0)
            tl.store(i64_out + rows, pred, mask=r_ok)
            tl.store(i32_out + rows, counter, mask=r_ok)
            exits = counter == patience
        elif POLICY == 3:  # Patience, regression
            value = tl.sum(tl.where((cs == 0)[None, :], z, 0.0), axis=1)
            prev_v = tl.load(f0_ptr + rows, mask=r_ok, other=0.0)
            agrees = tl.abs(value - prev_v) < reg_threshold
            counter = tl.load(i32_ptr + rows, mask=r_ok, other=0)
            counter = tl.where(agrees, counter + 1, 0)
            tl.store(f0_out + rows, value, mask=r_ok)
            tl.store(i32_out + rows, counter, mask=r_ok)
            exits = counter == patience
        elif POLICY == 4:  # QExit
            hl = tl.load(halt_ptr + rows * stride_halt, mask=r_ok, other=0.0).to(tl.float32)
            valid = tl.abs(hl) <= _FLT_MAX
            lam = tl.where(valid, tl.sigmoid(hl), 0.0)
            cdf = tl.load(f0_ptr + rows, mask=r_ok, other=0.0)
            rem = tl.load(f1_ptr + rows, mask=r_ok, other=0.0)
            cdf = cdf + lam * rem
            rem = rem * (1.0 - lam)
            tl.store(f0_out + rows, cdf, mask=r_ok)
            tl.store(f1_out + rows, rem, mask=r_ok)
            if STOCHASTIC:
                u = tl.load(aux_ptr + rows * stride_aux_n + (layer - 1) * stride_aux_l, mask=r_ok, other=2.0)
                exits = valid & finite & (u < lam)
            else:
                exits = valid & finite & (cdf > q)
        elif POLICY == 5:  # Voting
            pred = tl.argmax(zm, axis=1)
            vote = ((cs[None, :] == pred[:, None]) & finite[:, None]).to(tl.int32)
            probs = tl.where(finite[:, None], e / den[:, None], 0.0)
            votes = tl.load(vi_ptr + rc, mask=m2, other=0) + vote
            psum = tl.load(vf_ptr + rc, mask=m2, other=0.0) + probs
            tl.store(vi_out + rc, votes, mask=m2)
            tl.store(vf_out + rc, psum, mask=m2)
            score = votes.to(tl.float32) + psum / (layer + 1.0)
            total = tl.sum(tl.where(c_ok[None, :], score, 0.0), axis=1)
            returned = tl.log(score) - tl.log(total)[:, None]
            top = tl.max(tl.where(c_ok[None, :], votes, -1), axis=1)
            exits = finite & (top >= min_votes)
        elif POLICY == 6:  # DACT
            hl = tl.load(halt_ptr + rows * stride_halt, mask=r_ok, other=0.0).to(tl.float32)
            valid = finite & (tl.abs(hl) <= _FLT_MAX)
            pi_prev = tl.load(f0_ptr + rows, mask=r_ok, other=1.0)
            acc_prev = tl.load(vf_ptr + rc, mask=m2, other=0.0)
            acc_new = pi_prev[:, None] * (e / den[:, None]) + (1.0 - pi_prev)[:, None] * acc_prev
            pi_new = tl.sigmoid(hl) * pi_prev
            accd = tl.where(valid[:, None], acc_new, acc_prev)
            pi = tl.where(valid, pi_new, pi_prev)
            tl.store(vf_out + rc, accd, mask=m2)
            tl.store(f0_out + rows, pi, mask=r_ok)
            am = tl.where(c_ok[None, :], accd, float("-inf"))
            i1 = tl.argmax(am, axis=1)
            t1 = tl.max(am, axis=1)
            t2 = tl.max(tl.where(cs[None, :] == i1[:, None], float("-inf"), am), axis=1)
            base = 1.0 - pi
            power = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
            for _ in range(0, layers_left):
                power = power * base
            margin = t1 * power - t2 - layers_left * pi
            exits = valid & (margin > 0)
            returned = tl.log(accd)
        else:  # Scheduled
            planned = tl.load(aux_ptr + rows * stride_aux_n, mask=r_ok, other=0)
            exits = planned == layer

        if FORCE_EXIT:
            exits = r_ok
        tl.store(returned_ptr + rc, returned, mask=m2)
        tl.store(exits_ptr + rows, exits, mask=r_ok)

        if WRITE_BACK:  # the exiting rows' outputs, at their original positions
            leaving = r_ok & exits
            dst = tl.load(rows_ptr + rows, mask=leaving, other=0)
            leaving = leaving & (dst >= 0) & (dst < batch_out)  # a bad index must not write out of bounds
            tl.store(
                out_logits_ptr + dst[:, None] * stride_out_n + cs[None, :] * stride_out_c,
                returned.to(out_logits_ptr.dtype.element_ty),
                mask=leaving[:, None] & c_ok[None, :],
            )
            tl.store(out_exit_ptr + dst, tl.zeros((BLOCK_M,), dtype=tl.int64) + layer, mask=leaving)
            tl.store(out_runs_ptr + dst, tl.load(runs_ptr + rows, mask=leaving, other=0), mask=leaving)

        if SURVIVORS:
            if HAS_EXTENTS:
                staying = r_ok & ~exits
                extent = tl.load(ext_ptr + rows, mask=staying, other=0).to(tl.int64)
                longest = tl.maximum(longest, tl.max(tl.where(staying, extent, 0), axis=0))
            keep = (r_ok & ~exits).to(tl.int32)
            gone = (r_ok & exits).to(tl.int32)
            pos_keep = kept + tl.cumsum(keep, axis=0) - 1
            pos_gone = n - 1 - (dropped + tl.cumsum(gone, axis=0) - 1)
            pos = tl.where(keep > 0, pos_keep, pos_gone)
            tl.store(surv_ptr + pos, rows.to(tl.int64), mask=r_ok)
            kept += tl.sum(keep, axis=0)
            dropped += tl.sum(gone, axis=0)
    if SURVIVORS:
        tl.store(count_ptr, kept.to(tl.int64))
        tl.store(count_ptr + 1, longest)


# ----------------------------------------------------------------------------- launchers


def _head_blocks(n: int, hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the head kernel; BLOCK_N depends on H only."""
    if interpreting() and not FORCE_GPU_BLOCKS:
        # Fewer, larger programs: the interpreter's cost is per program and per op.
        return min(128, max(16, next_pow2(n))), min(256, max(16, next_pow2(hidden))), 256, 1
    return min(64, max(16, next_pow2(n))), 64, 64, 4


def _num_tiles(hidden: int) -> int:
    return triton.cdiv(hidden, _head_blocks(1, hidden)[1])


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


@triton_op("earlyexit::exit_head", mutates_args=())
def exit_head(
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    want_pooled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial logits [T, n, C] fp32, pooled [n, H] or [0, H])`` of the default head."""
    n, hidden = cls_hidden.shape
    num_labels = head_weight.shape[0]
    tiles = _num_tiles(hidden)
    zpart = new_empty((tiles, n, num_labels), torch.float32, cls_hidden.device)
    pooled = new_empty((n if want_pooled else 0, hidden), cls_hidden.dtype, cls_hidden.device)
    if n == 0:
        return zpart, pooled
    block_m, block_n, block_k, warps = _head_blocks(n, hidden)
    grid = (triton.cdiv(n, block_m), tiles)
    wrap_triton(_head_kernel)[grid](
        cls_hidden,
        cls_hidden.stride(0),
        cls_hidden.stride(1),
        pooler_weight,
        pooler_weight.stride(0),
        pooler_weight.stride(1),
        pooler_bias,
        head_weight,
        head_weight.stride(0),
        head_weight.stride(1),
        pooled if want_pooled else zpart,
        zpart,
        n,
        hidden,
        num_labels,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_C=max(16, next_pow2(num_labels)),
        DOT_FP32=_dot_fp32(cls_hidden.dtype),
        WRITE_POOLED=want_pooled,
        num_warps=warps,
    )
    return zpart, pooled


@exit_head.register_fake
def _exit_head_fake(cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled):
    n, hidden = cls_hidden.shape
    zpart = cls_hidden.new_empty((_num_tiles(hidden), n, head_weight.shape[0]), dtype=torch.float32)
    pooled = cls_hidden.new_empty((n if want_pooled else 0, hidden))
    return zpart, pooled


# Which state slot each policy reads and writes.
_SLOTS = {
    PATIENCE_CLS: {"i64": "prev_pred", "i32": "counter"},
    PATIENCE_REG: {"f0": "prev_value", "i32": "counter"},
    QEXIT: {"f0": "cdf", "f1": "remaining"},
    VOTING: {"vi": "votes", "vf": "prob_sum"},
    DACT_CODE: {"f0": "pi", "vf": "accumulated"},
}
_SLOT_DTYPES = {
    "f0": torch.float32,
    "f1": torch.float32,
    "i32": torch.int32,
    "i64": torch.int64,
    "vf": torch.float32,
    "vi": torch.int32,
}
_SLOT_ORDER = ("f0", "f1", "i32", "i64", "vf", "vi")


def _decide_shapes(n: int, num_labels: int, policy_code: int, from_partials: bool, survivors: bool):
    """Output shapes and dtypes (except logits' dtype) of ``earlyexit::exit_decide``."""
    used = _SLOTS.get(policy_code, {})
    shapes = [((n,), torch.bool), ((n, num_labels), torch.float32), ((n if from_partials else 0, num_labels), None)]
    for slot in _SLOT_ORDER:
        rows = n if slot in used else 0
        shape = (rows, num_labels) if slot in ("vf", "vi") else (rows,)
        shapes.append((shape, _SLOT_DTYPES[slot]))
    shapes.append(((n if survivors else 0,), torch.int64))
    shapes.append(((2 if survivors else 0,), torch.int64))
    return shapes


@triton_op("earlyexit::exit_decide", mutates_args=("out_logits", "out_exit_layer", "out_layers_run"))
def exit_decide(
    src: torch.Tensor,
    head_bias: torch.Tensor | None,
    halting: torch.Tensor | None,
    f0: torch.Tensor | None,
    f1: torch.Tensor | None,
    i32: torch.Tensor | None,
    i64: torch.Tensor | None,
    vf: torch.Tensor | None,
    vi: torch.Tensor | None,
    aux: torch.Tensor | None,
    rows: torch.Tensor | None,
    runs: torch.Tensor | None,
    extents: torch.Tensor | None,
    out_logits: torch.Tensor,
    out_exit_layer: torch.Tensor,
    out_layers_run: torch.Tensor,
    policy_code: int,
    layer: int,
    num_layers: int,
    threshold: float,
    temperature: float,
    reg_threshold: float,
    q: float,
    patience: int,
    min_votes: int,
    normalized: bool,
    has_temperature: bool,
    stochastic: bool,
    from_partials: bool,
    survivors: bool,
    write_back: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """The policy's decision on logits ``src`` [n, C] (or partial logits [T, n, C] plus ``head_bias``).

    Returns ``(exits, returned, logits, f0, f1, i32, i64, vf, vi, survivor_index, survivor_stats)``;
    state slots the policy does not use, ``logits`` without partials and the survivor
    outputs when not asked for have 0 rows. ``survivor_stats`` is ``(count, longest extent
    of a staying row)``, the extent 0 without ``extents``.

    With ``write_back`` the exiting rows' returned logits, ``layer`` and ``runs`` go to
    ``out_logits`` [B, C], ``out_exit_layer`` [B] and ``out_layers_run`` [B] at positions
    ``rows`` (the outputs may be empty otherwise).
    """
    device = src.device
    n, num_labels = src.shape[-2], src.shape[-1]
    logits_dtype = head_bias.dtype if (from_partials and head_bias is not None) else torch.float32
    outs = [
        new_empty(shape, dtype if dtype is not None else logits_dtype, device)
        for shape, dtype in _decide_shapes(n, num_labels, policy_code, from_partials, survivors)
    ]
    exits, returned, logits = outs[0], outs[1], outs[2]
    slot_out = dict(zip(_SLOT_ORDER, outs[3:9]))
    surv, count = outs[9], outs[10]
    dummy = returned if n > 0 else new_empty((1,), torch.float32, device)
    inputs = dict(zip(_SLOT_ORDER, (f0, f1, i32, i64, vf, vi)))
    used = _SLOTS.get(policy_code, {})
    for slot in used:
        if inputs[slot] is None:
            raise ValueError(f"exit_decide: state slot {slot} is required for policy code {policy_code}")
    src_ptrs = [inputs[s] if s in used else dummy for s in _SLOT_ORDER]
    out_ptrs = [slot_out[s] if s in used else dummy for s in _SLOT_ORDER]
    if from_partials:
        stride_sn, stride_sc, tiles = num_labels, 1, src.shape[0]
    else:
        stride_sn, stride_sc, tiles = src.stride(0), src.stride(1), 1
    halt = halting if halting is not None else dummy
    aux_t = aux if aux is not None else dummy
    aux_n = aux_t.stride(0) if aux is not None else 0
    aux_l = aux_t.stride(1) if (aux is not None and aux_t.dim() == 2) else 0
    if write_back:
        if rows is None or runs is None:
            raise ValueError("exit_decide: write_back needs rows and runs")
        if not survivors:
            raise ValueError("exit_decide: write_back comes with the survivor outputs")
        target = WriteBack(rows, runs, extents, out_logits, out_exit_layer, out_layers_run)
        _check_target(target, n, num_labels, device)
    has_extents = survivors and extents is not None
    block_m = min(256 if interpreting() else 128, max(16, next_pow2(n)))
    wrap_triton(_decide_kernel)[(1,)](
        src,
        stride_sn,
        stride_sc,
        tiles,
        head_bias if head_bias is not None else dummy,
        logits if from_partials and n > 0 else dummy,
        returned if n > 0 else dummy,
        exits,
        halt,
        halt.stride(0) if halting is not None else 0,
        *src_ptrs,
        aux_t,
        aux_n,
        aux_l,
        *out_ptrs,
        surv if survivors and n > 0 else dummy,
        count if survivors else dummy,
        rows if write_back else dummy,
        runs if write_back else dummy,
        extents if has_extents else dummy,
        out_logits if write_back else dummy,
        out_logits.stride(0) if write_back else 0,
        out_logits.stride(1) if write_back else 0,
        out_exit_layer if write_back else dummy,
        out_layers_run if write_back else dummy,
        out_exit_layer.shape[0] if write_back else 0,
        n,
        num_labels,
        layer,
        threshold,
        temperature,
        math.log(num_labels) if num_labels > 1 else 1.0,
        reg_threshold,
        q,
        patience,
        min_votes,
        max(num_layers - layer, 0),
        POLICY=policy_code,
        NORMALIZED=normalized,
        HAS_TEMPERATURE=has_temperature,
        STOCHASTIC=stochastic,
        FROM_PARTIALS=from_partials,
        FORCE_EXIT=layer >= num_layers,
        SURVIVORS=survivors,
        WRITE_BACK=write_back,
        HAS_EXTENTS=has_extents,
        BLOCK_M=block_m,
        BLOCK_C=max(2, next_pow2(num_labels)),
        num_warps=4,
    )
    return tuple(outs)


@exit_decide.register_fake
def _exit_decide_fake(
    src,
    head_bias,
    halting,
    f0,
    f1,
    i32,
    i64,
    vf,
    vi,
    aux,
    rows,
    runs,
    extents,
    out_logits,
    out_exit_layer,
    out_layers_run,
    policy_code,
    layer,
    num_layers,
    threshold,
    temperature,
    reg_threshold,
    q,
    patience,
    min_votes,
    normalized,
    has_temperature,
    stochastic,
    from_partials,
    survivors,
    write_back,
):
    n, num_labels = src.shape[-2], src.shape[-1]
    logits_dtype = head_bias.dtype if (from_partials and head_bias is not None) else torch.float32
    return tuple(
        src.new_empty(shape, dtype=dtype if dtype is not None else logits_dtype)
        for shape, dtype in _decide_shapes(n, num_labels, policy_code, from_partials, survivors)
    )


# ----------------------------------------------------------------------------- wrappers


def _policy_code(policy: ExitPolicy) -> int:
    if isinstance(policy, (Entropy, SkipGates)):
        return ENTROPY
    if isinstance(policy, MaxProb):
        return MAXPROB
    if isinstance(policy, Patience):
        return PATIENCE_REG if policy.is_regression else PATIENCE_CLS
    if isinstance(policy, QExit):
        return QEXIT
    if isinstance(policy, Voting):
        return VOTING
    if isinstance(policy, DACT):
        return DACT_CODE
    if isinstance(policy, Scheduled):
        return SCHEDULED
    raise TypeError(f"unknown exit policy {type(policy).__name__}")


def _decide(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    src: torch.Tensor,
    head_bias: torch.Tensor | None,
    halting_logit: torch.Tensor | None,
    state: State,
    from_partials: bool,
    target: WriteBack | None = None,
):
    """One decide launch; with ``target`` it also writes back and orders the survivors."""
    code = _policy_code(policy)
    threshold = temperature = reg_threshold = q = 0.0
    patience = min_votes = 0
    normalized = has_temperature = stochastic = False
    if isinstance(policy, Entropy):
        threshold, normalized = layer_value(policy.threshold, layer), policy.normalized
    elif isinstance(policy, SkipGates):
        threshold, normalized = layer_value(policy.entropy_threshold, layer), policy.normalized
    elif isinstance(policy, MaxProb):
        threshold = layer_value(policy.threshold, layer)
        if policy.temperature is not None:
            has_temperature, temperature = True, layer_value(policy.temperature, layer)
    elif isinstance(policy, Patience):
        patience = policy.patience
        if policy.is_regression:
            reg_threshold = policy.regression_threshold
    elif isinstance(policy, QExit):
        q, stochastic = policy.q, policy.stochastic
    elif isinstance(policy, Voting):
        min_votes = policy.min_votes
    if code in (QEXIT, DACT_CODE) and halting_logit is None:
        raise ValueError(f"{type(policy).__name__} needs a halting logit")
    slots = _SLOTS.get(code, {})
    state_in = {slot: state[key].contiguous() for slot, key in slots.items()}
    aux = None
    if code == QEXIT and stochastic:
        aux = state["uniforms"]
    elif code == SCHEDULED:
        aux = state["exit_layers"]
    if target is None:
        rows = runs = extents = None
        out_logits = new_empty((0, src.shape[-1]), torch.float32, src.device)
        out_exit, out_runs = new_empty((0,), torch.int64, src.device), new_empty((0,), torch.int64, src.device)
    else:
        rows, runs, extents = target.rows, target.runs, target.extents
        out_logits, out_exit, out_runs = target.logits, target.exit_layer, target.layers_run
    outs = torch.ops.earlyexit.exit_decide(
        src,
        head_bias,
        halting_logit if code in (QEXIT, DACT_CODE) else None,
        state_in.get("f0"),
        state_in.get("f1"),
        state_in.get("i32"),
        state_in.get("i64"),
        state_in.get("vf"),
        state_in.get("vi"),
        aux,
        rows,
        runs,
        extents,
        out_logits,
        out_exit,
        out_runs,
        code,
        layer,
        num_layers,
        float(threshold),
        float(temperature),
        float(reg_threshold),
        float(q),
        int(patience),
        int(min_votes),
        normalized,
        has_temperature,
        stochastic,
        from_partials,
        target is not None,
        target is not None,
    )
    exits, returned, logits = outs[0], outs[1], outs[2]
    new_state = dict(state)
    for slot, key in slots.items():
        new_state[key] = outs[3 + _SLOT_ORDER.index(slot)]
    return exits, returned, logits, new_state, outs[9], outs[10]


def _check_target(target: WriteBack, n: int, num_labels: int, device: torch.device) -> None:
    """The kernel indexes raw pointers with these: a wrong shape, dtype or layout must fail here."""
    for name, t, dtype, shape in (
        ("rows", target.rows, torch.int64, (n,)),
        ("runs", target.runs, torch.int64, (n,)),
        ("extents", target.extents, torch.int64, (n,)),
        ("exit_layer", target.exit_layer, torch.int64, None),
        ("layers_run", target.layers_run, torch.int64, None),
    ):
        if t is None and name == "extents":
            continue
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape) or t.device != device:
            raise ValueError(
                f"WriteBack.{name} must be {dtype} [{shape[0] if shape else 'B'}] on {device}, "
                f"got {t.dtype} {list(t.shape)} on {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"WriteBack.{name} must be contiguous (the kernel reads it with unit stride)")
    batch = target.exit_layer.shape[0]
    if target.logits.shape != (batch, num_labels) or target.layers_run.shape != (batch,):
        raise ValueError(
            f"WriteBack outputs must be logits [B, {num_labels}], exit_layer [B] and layers_run [B]; got "
            f"{list(target.logits.shape)}, {list(target.exit_layer.shape)}, {list(target.layers_run.shape)}"
        )
    if target.logits.device != device:
        raise ValueError(f"WriteBack.logits must be on {device}, got {target.logits.device}")
    if target.logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"WriteBack.logits must be float32, float16 or bfloat16, got {target.logits.dtype}")


def exit_step_write_back(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
    target: WriteBack,
) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`earlyexit_kernels.write_back.exit_step_write_back`: one launch.

    ``order[:count]`` are the rows that stay, in increasing order; ``order[count:]`` are the
    exiting rows in decreasing order, so every element is defined.
    """
    exits, _, _, state, order, stats = _decide(
        policy, layer, num_layers, logits, None, halting_logit, state, False, target
    )
    return exits, state, order, stats


def exit_step(
    policy: ExitPolicy,
    layer: int,
    num_layers: int,
    logits: torch.Tensor,
    halting_logit: torch.Tensor | None,
    state: State,
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """Triton version of :func:`earlyexit_kernels.exit_rules.exit_step` (same arguments and results)."""
    exits, returned, _, state, _, _ = _decide(
        policy, layer, num_layers, logits, None, halting_logit, state, from_partials=False
    )
    return exits, returned, state


def _head(
    target, policy, layer, num_layers, cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias, state, halting_fn
):
    """Both launches; with ``target`` the decision also writes back and orders the survivors."""
    dtypes = {t.dtype for t in (cls_hidden, pooler_weight, pooler_bias, head_weight, head_bias)}
    if len(dtypes) != 1:
        raise TypeError(
            f"head_exit_step: hidden states and head weights must share one dtype, got {sorted(map(str, dtypes))}"
        )
    want_pooled = halting_fn is not None or "prev_pooled" in state
    zpart, pooled = torch.ops.earlyexit.exit_head(cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled)
    halting = halting_fn(pooled, state.get("prev_pooled")) if halting_fn is not None else None
    exits, returned, logits, state, order, stats = _decide(
        policy, layer, num_layers, zpart, head_bias, halting, state, True, target
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
    """Triton version of :func:`earlyexit_kernels.exit_rules.head_exit_step` (same arguments and results)."""
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
    """Triton version of :func:`earlyexit_kernels.write_back.head_exit_step_write_back`: two launches."""
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
