"""The Triton kernel of the exit decision, and its launcher.

``_decide_kernel`` (one program per block of rows; one program with the write-back, whose
survivor list is a scan): sums the head's partials where it follows the head kernel, adds
``b_i``, rounds the logits to the model dtype (what
:func:`earlyexit_kernels.methods.exit_rules.exit_step` receives), and applies the policy:
softmax, entropy / max-probability / patience / Q-exit / voting / DACT / schedule, non-finite
handling, forced exit at the last layer, the new state and, optionally, the write-back and
the stable survivor order and count. The policy arrives as the codes of
:mod:`earlyexit_kernels.backends.policy_lowering`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from earlyexit_kernels.backends.policy_lowering import PolicyKind, RuleFlag
from earlyexit_kernels.backends.triton_kernels._common import (
    cdiv,
    device_guard,
    interpreting,
    new_empty,
    pow2_bucket,
)

# Policy codes (constexpr in the kernel): backends/policy_lowering.py's PolicyKind as plain ints.
ENTROPY, MAXPROB, PATIENCE_CLS, PATIENCE_REG, QEXIT, VOTING, DACT_CODE, SCHEDULED = (int(k) for k in PolicyKind)

# Bits of the decision's ``flags``: the policy's own (RuleFlag), then this kernel's.
F_NORMALIZED, F_TEMPERATURE, F_STOCHASTIC = (int(f) for f in RuleFlag)
F_PARTIALS, F_WRITE_BACK, F_RETURNED, F_LOGITS = (1 << i for i in range(3, 7))

_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# Tests set this to run the GPU block sizes under the interpreter too.
FORCE_GPU_BLOCKS = False

# Integer arguments that change from call to call: never specialized (see exit_step's docstring).
DECIDE_PER_CALL = ("n", "layer", "layers_left", "batch_out", "int_param")


@triton.jit(do_not_specialize=DECIDE_PER_CALL)
def _decide_kernel(
    src_ptr,
    stride_sn,
    stride_sc,
    num_tiles,
    bias_ptr,
    stride_b,
    logits_ptr,
    returned_ptr,
    exits_ptr,
    halt_ptr,
    stride_halt,
    s0_ptr,
    s1_ptr,
    s0_out,
    s1_out,
    aux_ptr,
    stride_aux_n,
    stride_aux_l,
    order_ptr,
    stats_ptr,
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
    layers_left,
    fa,
    fb,
    int_param,
    POLICY: tl.constexpr,
    NORMALIZED: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    STORE_RETURNED: tl.constexpr,
    FORCE_EXIT: tl.constexpr,
    WRITE_BACK: tl.constexpr,
    HAS_EXTENTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program p decides rows p*BLOCK_M.. (and every num_programs-th block after). With the
    write-back one program walks all rows in blocks of BLOCK_M, so the survivor list is in
    stable order.

    Policy state: two slots ``s0``, ``s1`` (in and out) whose meaning depends on POLICY:
    Patience (prev_pred | prev_value, counter), QExit (cdf, remaining), Voting (votes,
    prob_sum; [n, C]), DACT (pi, accumulated [n, C]). ``fa``, ``fb``: Entropy (threshold,
    ln C), MaxProb (threshold, temperature), Patience regression (threshold, -), QExit
    (q, -). ``int_param``: Patience's patience, Voting's minimum votes.
    """
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    kept = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int32), axis=0)
    dropped = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int32), axis=0)
    longest = tl.sum(tl.zeros((BLOCK_M,), dtype=tl.int64), axis=0)
    for start in range(tl.program_id(0) * BLOCK_M, n, BLOCK_M * tl.num_programs(0)):
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < n
        m2 = r_ok[:, None] & c_ok[None, :]
        rc = rows[:, None] * C + cs[None, :]  # offsets into contiguous [n, C] buffers

        if FROM_PARTIALS:
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for t in range(0, num_tiles):
                acc += tl.load(src_ptr + t * n * C + rc, mask=m2, other=0.0)
            acc += tl.load(bias_ptr + cs * stride_b, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            # Rounded to the model dtype, which is the bias's: logits_ptr is a placeholder of
            # another dtype when the logits are not stored (the write-back path).
            lg = acc.to(bias_ptr.dtype.element_ty)
            if STORE_LOGITS:
                tl.store(logits_ptr + rc, lg, mask=m2)
            z = lg.to(tl.float32)
        else:
            z = tl.load(src_ptr + rows[:, None] * stride_sn + cs[None, :] * stride_sc, mask=m2, other=0.0).to(
                tl.float32
            )

        bad = tl.where(m2 & ~(tl.abs(z) <= _FLT_MAX), 1, 0)
        finite = tl.sum(bad, axis=1) == 0
        # argmax never sees NaN: a non-finite row's prediction is not used (and an all-NaN
        # row would make the interpreter's argmax raise). Rows past n are masked too: from
        # the partials they hold the bias, NaN when the bias is.
        z_arg = tl.where(m2 & finite[:, None], z, float("-inf"))
        returned = z

        if POLICY == 0 or POLICY == 1 or POLICY == 5 or POLICY == 6:
            zs = z
            if POLICY == 1:
                if HAS_TEMPERATURE:
                    zs = z / fb
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
                ent = ent / fb
            exits = finite & (ent < fa)
        elif POLICY == 1:  # MaxProb
            max_p = 1.0 / den
            exits = finite & (max_p >= fa)
        elif POLICY == 2:  # Patience, classification: s0 prev_pred (int64), s1 counter (int32)
            pred = tl.argmax(z_arg, axis=1).to(tl.int64)
            pred = tl.where(finite, pred, -1)
            prev = tl.load(s0_ptr + rows, mask=r_ok, other=-1)
            agrees = (pred == prev) & finite
            counter = tl.load(s1_ptr + rows, mask=r_ok, other=0)
            counter = tl.where(agrees, counter + 1, 0)
            tl.store(s0_out + rows, pred, mask=r_ok)
            tl.store(s1_out + rows, counter, mask=r_ok)
            exits = counter == int_param
        elif POLICY == 3:  # Patience, regression: s0 prev_value, s1 counter
            value = tl.sum(tl.where((cs == 0)[None, :], z, 0.0), axis=1)
            prev_v = tl.load(s0_ptr + rows, mask=r_ok, other=0.0)
            agrees = tl.abs(value - prev_v) < fa
            counter = tl.load(s1_ptr + rows, mask=r_ok, other=0)
            counter = tl.where(agrees, counter + 1, 0)
            tl.store(s0_out + rows, value, mask=r_ok)
            tl.store(s1_out + rows, counter, mask=r_ok)
            exits = counter == int_param
        elif POLICY == 4:  # QExit: s0 cdf, s1 remaining
            hl = tl.load(halt_ptr + rows * stride_halt, mask=r_ok, other=0.0).to(tl.float32)
            valid = tl.abs(hl) <= _FLT_MAX
            lam = tl.where(valid, tl.sigmoid(hl), 0.0)
            cdf = tl.load(s0_ptr + rows, mask=r_ok, other=0.0)
            rem = tl.load(s1_ptr + rows, mask=r_ok, other=0.0)
            cdf = cdf + lam * rem
            rem = rem * (1.0 - lam)
            tl.store(s0_out + rows, cdf, mask=r_ok)
            tl.store(s1_out + rows, rem, mask=r_ok)
            if STOCHASTIC:
                u = tl.load(aux_ptr + rows * stride_aux_n + (layer - 1) * stride_aux_l, mask=r_ok, other=2.0)
                exits = valid & finite & (u < lam)
            else:
                exits = valid & finite & (cdf > fa)
        elif POLICY == 5:  # Voting: s0 votes [n, C] (int32), s1 prob_sum [n, C]
            pred = tl.argmax(z_arg, axis=1)
            vote = ((cs[None, :] == pred[:, None]) & finite[:, None]).to(tl.int32)
            probs = tl.where(finite[:, None], e / den[:, None], 0.0)
            votes = tl.load(s0_ptr + rc, mask=m2, other=0) + vote
            psum = tl.load(s1_ptr + rc, mask=m2, other=0.0) + probs
            tl.store(s0_out + rc, votes, mask=m2)
            tl.store(s1_out + rc, psum, mask=m2)
            score = votes.to(tl.float32) + psum / (layer + 1.0)
            total = tl.sum(tl.where(c_ok[None, :], score, 0.0), axis=1)
            returned = tl.log(score) - tl.log(total)[:, None]
            top = tl.max(tl.where(c_ok[None, :], votes, -1), axis=1)
            exits = finite & (top >= int_param)
        elif POLICY == 6:  # DACT: s0 pi, s1 accumulated [n, C]
            hl = tl.load(halt_ptr + rows * stride_halt, mask=r_ok, other=0.0).to(tl.float32)
            valid = finite & (tl.abs(hl) <= _FLT_MAX)
            pi_prev = tl.load(s0_ptr + rows, mask=r_ok, other=1.0)
            acc_prev = tl.load(s1_ptr + rc, mask=m2, other=0.0)
            acc_new = pi_prev[:, None] * (e / den[:, None]) + (1.0 - pi_prev)[:, None] * acc_prev
            pi_new = tl.sigmoid(hl) * pi_prev
            accd = tl.where(valid[:, None], acc_new, acc_prev)
            pi = tl.where(valid, pi_new, pi_prev)
            tl.store(s1_out + rc, accd, mask=m2)
            tl.store(s0_out + rows, pi, mask=r_ok)
            # A NaN in the accumulated state (never from valid steps) tops topk in the
            # reference, so the margin is NaN and the row stays; argmax never sees it.
            acc_nan = tl.sum(tl.where(m2 & (accd != accd), 1, 0), axis=1) > 0
            am = tl.where(m2 & ~acc_nan[:, None], accd, float("-inf"))
            i1 = tl.argmax(am, axis=1)
            t1 = tl.max(am, axis=1)
            t2 = tl.max(tl.where(cs[None, :] == i1[:, None], float("-inf"), am), axis=1)
            base = 1.0 - pi
            power = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
            for _ in range(0, layers_left):
                power = power * base
            margin = t1 * power - t2 - layers_left * pi
            exits = valid & ~acc_nan & (margin > 0)
            returned = tl.log(accd)
        else:  # Scheduled
            planned = tl.load(aux_ptr + rows * stride_aux_n, mask=r_ok, other=0)
            exits = planned == layer

        if FORCE_EXIT:
            exits = r_ok
        if STORE_RETURNED:
            tl.store(returned_ptr + rc, returned, mask=m2)
        tl.store(exits_ptr + rows, exits, mask=r_ok)

        if WRITE_BACK:  # the exiting rows' outputs at their original positions, the survivors in order
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

            if HAS_EXTENTS:
                staying = r_ok & ~exits
                extent = tl.load(ext_ptr + rows, mask=staying, other=0).to(tl.int64)
                longest = tl.maximum(longest, tl.max(tl.where(staying, extent, 0), axis=0))
            keep = (r_ok & ~exits).to(tl.int32)
            gone = (r_ok & exits).to(tl.int32)
            pos_keep = kept + tl.cumsum(keep, axis=0) - 1
            pos_gone = n - 1 - (dropped + tl.cumsum(gone, axis=0) - 1)
            pos = tl.where(keep > 0, pos_keep, pos_gone)
            tl.store(order_ptr + pos, rows.to(tl.int64), mask=r_ok)
            kept += tl.sum(keep, axis=0)
            dropped += tl.sum(gone, axis=0)
    if WRITE_BACK:
        tl.store(stats_ptr, kept.to(tl.int64))
        tl.store(stats_ptr + 1, longest)


def _decide_launch(n, num_labels, write_back: bool) -> tuple[int, int, object, int]:
    """(BLOCK_M, BLOCK_C, programs, num_warps) of the decision kernel (sizes may be SymInts).

    Without the write-back rows are independent: one program per BLOCK_M rows. The write-back
    lists the survivors in order, a scan over the rows: one program walks them, in blocks of
    256 rows on 8 warps on a GPU (512-row blocks left a 16-byte stack frame for Voting on
    sm_90; make triton-check).
    """
    block_c = pow2_bucket(num_labels, 2)
    if interpreting() and not FORCE_GPU_BLOCKS:
        block_m = pow2_bucket(n, 16, 256)
        return block_m, block_c, 1 if write_back else cdiv(n, block_m), 4
    # On a GPU the block sizes do not depend on n (one variant per policy, see _head_blocks).
    if write_back:
        return 256, block_c, 1, 8
    return 128, block_c, cdiv(n, 128), 4


# Each policy's state in the kernel's two slots: (key, dtype, one value per label).
_SLOTS: dict[int, tuple[tuple[str, torch.dtype, bool], ...]] = {
    PATIENCE_CLS: (("prev_pred", torch.int64, False), ("counter", torch.int32, False)),
    PATIENCE_REG: (("prev_value", torch.float32, False), ("counter", torch.int32, False)),
    QEXIT: (("cdf", torch.float32, False), ("remaining", torch.float32, False)),
    VOTING: (("votes", torch.int32, True), ("prob_sum", torch.float32, True)),
    DACT_CODE: (("pi", torch.float32, False), ("accumulated", torch.float32, True)),
}


def _decide_outputs(n: int, num_labels: int, code: int, flags: int, logits_dtype, empty, placeholders: bool):
    """``(exits, returned, logits, s0, s1, order, stats)`` of a decision; what the flags do not
    ask for is None, or an empty tensor (0 rows) with ``placeholders``. ``empty(shape, dtype)``
    allocates."""
    none = (lambda shape, dtype: empty((0, *shape[1:]), dtype)) if placeholders else (lambda shape, dtype: None)
    pair = (n, num_labels)
    exits = empty((n,), torch.bool)
    returned = (empty if flags & F_RETURNED else none)(pair, torch.float32)
    logits = (empty if flags & F_LOGITS else none)(pair, logits_dtype)
    slots = _SLOTS.get(code)
    if slots is None:
        s0, s1 = none((n,), torch.float32), none((n,), torch.float32)
    else:
        (_, dtype0, wide0), (_, dtype1, wide1) = slots
        s0, s1 = empty(pair if wide0 else (n,), dtype0), empty(pair if wide1 else (n,), dtype1)
    if flags & F_WRITE_BACK:
        order, stats = empty((n,), torch.int64), empty((2,), torch.int64)
    else:
        order, stats = none((n,), torch.int64), none((2,), torch.int64)
    return exits, returned, logits, s0, s1, order, stats


def _empty(device, shape, dtype):
    return new_empty(shape, dtype, device)


def _run_decide(
    wrap,
    src,
    head_bias,
    halting,
    s0,
    s1,
    aux,
    rows,
    runs,
    extents,
    out_logits,
    out_exit_layer,
    out_layers_run,
    code: int,
    layer: int,
    num_layers: int,
    fa: float,
    fb: float,
    int_param: int,
    flags: int,
    placeholders: bool,
):
    """Allocate and launch one decision; see :func:`exit_decide` for the arguments and results."""
    device = src.device
    n, num_labels = src.shape[-2], src.shape[-1]
    from_partials = bool(flags & F_PARTIALS)
    write_back = bool(flags & F_WRITE_BACK)
    logits_dtype = head_bias.dtype if from_partials else torch.float32
    outs = _decide_outputs(n, num_labels, code, flags, logits_dtype, functools.partial(_empty, device), placeholders)
    exits, returned, logits, s0_out, s1_out, order, stats = outs
    if code in _SLOTS and (s0 is None or s1 is None):
        raise ValueError(f"exit_decide: policy code {code} needs its two state tensors")
    if code in (QEXIT, DACT_CODE) and halting is None:
        raise ValueError(f"exit_decide: policy code {code} needs the halting logit")
    if (code == SCHEDULED or (code == QEXIT and flags & F_STOCHASTIC)) and aux is None:
        raise ValueError(f"exit_decide: policy code {code} needs its per-row schedule or uniforms")
    if write_back:
        if rows is None or runs is None:
            raise ValueError("exit_decide: the write-back needs rows and runs")
        _check_target(rows, runs, extents, out_logits, out_exit_layer, out_layers_run, n, num_labels, device)
    if n == 0:  # nothing to decide; the survivor count and longest extent are 0
        if write_back:
            stats.zero_()
        return outs
    dummy = src  # the kernel never dereferences the pointers its constexprs switch off
    if from_partials:
        stride_sn, stride_sc, tiles = num_labels, 1, src.shape[0]
    else:
        stride_sn, stride_sc, tiles = src.stride(0), src.stride(1), 1
    has_extents = write_back and extents is not None
    block_m, block_c, programs, warps = _decide_launch(n, num_labels, write_back)
    with device_guard(src):
        wrap(_decide_kernel)[(programs,)](
            src,
            stride_sn,
            stride_sc,
            tiles,
            head_bias if from_partials else dummy,
            head_bias.stride(0) if from_partials else 0,
            logits if logits is not None and logits.numel() else dummy,
            returned if returned is not None and returned.numel() else dummy,
            exits,
            halting if halting is not None else dummy,
            halting.stride(0) if halting is not None else 0,
            s0 if s0 is not None else dummy,
            s1 if s1 is not None else dummy,
            s0_out if s0 is not None else dummy,
            s1_out if s1 is not None else dummy,
            aux if aux is not None else dummy,
            aux.stride(0) if aux is not None else 0,
            aux.stride(1) if aux is not None and aux.dim() == 2 else 0,
            order if write_back else dummy,
            stats if write_back else dummy,
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
            max(num_layers - layer, 0),
            fa,
            fb,
            int_param,
            POLICY=code,
            NORMALIZED=bool(flags & F_NORMALIZED),
            HAS_TEMPERATURE=bool(flags & F_TEMPERATURE),
            STOCHASTIC=bool(flags & F_STOCHASTIC),
            FROM_PARTIALS=from_partials,
            STORE_LOGITS=bool(flags & F_LOGITS) and from_partials,
            STORE_RETURNED=bool(flags & F_RETURNED),
            FORCE_EXIT=layer >= num_layers,
            WRITE_BACK=write_back,
            HAS_EXTENTS=has_extents,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return outs


def _check_target(rows, runs, extents, logits, exit_layer, layers_run, n: int, num_labels: int, device) -> None:
    """The kernel indexes raw pointers with these: a wrong shape, dtype or layout must fail here."""
    i64 = torch.int64
    batch = exit_layer.shape[0] if exit_layer.dim() == 1 else -1
    if (
        rows.dtype == i64
        and runs.dtype == i64
        and exit_layer.dtype == i64
        and layers_run.dtype == i64
        and rows.shape == (n,)
        and runs.shape == (n,)
        and layers_run.shape == (batch,)
        and logits.shape == (batch, num_labels)
        and rows.is_contiguous()
        and runs.is_contiguous()
        and exit_layer.is_contiguous()
        and layers_run.is_contiguous()
        and rows.device == device
        and runs.device == device
        and exit_layer.device == device
        and layers_run.device == device
        and logits.device == device
        and logits.dtype in _OUT_DTYPES
        and (
            extents is None
            or (extents.dtype == i64 and extents.shape == (n,) and extents.is_contiguous() and extents.device == device)
        )
    ):
        return
    _explain_target(rows, runs, extents, logits, exit_layer, layers_run, n, num_labels, device)


_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _explain_target(rows, runs, extents, logits, exit_layer, layers_run, n, num_labels, device) -> None:
    """Raise the ``ValueError`` that says what is wrong with a write-back target."""
    for name, t, batch_sized in (
        ("rows", rows, False),
        ("runs", runs, False),
        ("extents", extents, False),
        ("exit_layer", exit_layer, True),
        ("layers_run", layers_run, True),
    ):
        if t is None:
            continue
        if t.dtype != torch.int64 or t.dim() != 1 or (not batch_sized and t.shape[0] != n) or t.device != device:
            raise ValueError(
                f"WriteBack.{name} must be {torch.int64} [{'B' if batch_sized else n}] on {device}, "
                f"got {t.dtype} {list(t.shape)} on {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"WriteBack.{name} must be contiguous (the kernel reads it with unit stride)")
    if logits.shape != (exit_layer.shape[0], num_labels) or layers_run.shape != exit_layer.shape:
        raise ValueError(
            f"WriteBack outputs must be logits [B, {num_labels}], exit_layer [B] and layers_run [B]; got "
            f"{list(logits.shape)}, {list(exit_layer.shape)}, {list(layers_run.shape)}"
        )
    if logits.device != device:
        raise ValueError(f"WriteBack.logits must be on {device}, got {logits.device}")
    raise ValueError(f"WriteBack.logits must be float32, float16 or bfloat16, got {logits.dtype}")
