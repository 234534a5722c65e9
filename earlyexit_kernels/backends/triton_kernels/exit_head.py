"""The Triton kernel of an exit head's two Linear layers, and its launcher.

``_head_kernel``: for the active rows it reads one vector per sequence through a strided
``[n, H]`` view (the [CLS] rows, or the pooled and normalised rows of :mod:`.pool_norm`) and
computes ``pooled = act(W_p h + b_p)`` over ``W_p`` [M, H] (fp32 accumulation; ``act``: the
model pooler's tanh, or an MLP head's exact GELU) and, in the same program, the partial logits
``pooled[:, tile] @ W_i[:, tile]^T`` of its column tile of ``pooled``. ``W_p h + b_p`` is
rounded to the input dtype before the activation, as ``F.linear`` returns it in the reference. Partials go to a small fp32 buffer ``[T, n, C]`` (no atomics, so the
result does not depend on scheduling); the decision kernel (:mod:`.exit_decide`) sums them.
fp32 inputs use IEEE fp32 products (``input_precision="ieee"``, no TF32); under the
interpreter bf16 tiles are widened to fp32 before ``tl.dot`` (the interpreter's ``dot``
treats bf16 as integers; the products of bf16 values are exact in fp32). ``pooled`` is
rounded to the input dtype before the second product, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from earlyexit_kernels.backends.triton_kernels._common import (
    cdiv,
    device_guard,
    interpreting,
    new_empty,
    pow2_bucket,
)

# Tests set this to run the GPU block sizes under the interpreter too.
FORCE_GPU_BLOCKS = False

# Integer arguments that change from call to call: never specialized (see exit_step's docstring).
HEAD_PER_CALL = ("n",)


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit(do_not_specialize=HEAD_PER_CALL)
def _head_kernel(
    h_ptr,
    stride_hn,
    stride_hk,
    wp_ptr,
    stride_wpo,
    stride_wpi,
    bp_ptr,
    stride_bp,
    wi_ptr,
    stride_wic,
    stride_wik,
    pooled_ptr,
    zpart_ptr,
    n,
    H,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WRITE_POOLED: tl.constexpr,
    GELU: tl.constexpr,
):
    """Program (pid_m, pid_n): rows pid_m*BLOCK_M.., pooled columns pid_n*BLOCK_N.."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n
    col_ok = cols < M
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
    pre = acc + tl.load(bp_ptr + cols * stride_bp, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pre = pre.to(wi_ptr.dtype.element_ty).to(tl.float32)
    if GELU:
        pooled = _gelu(pre).to(wi_ptr.dtype.element_ty)
    else:
        pooled = _tanh(pre).to(wi_ptr.dtype.element_ty)
    if WRITE_POOLED:
        tl.store(
            pooled_ptr + rows.to(tl.int64)[:, None] * M + cols[None, :],
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
        zpart_ptr + (pid_n * n).to(tl.int64) * C + rows[:, None] * C + cs[None, :],
        z,
        mask=row_ok[:, None] & (cs < C)[None, :],
    )


def _head_blocks(n, hidden, dot_fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the head kernel; BLOCK_N depends on ``hidden``
    (the first Linear's output width M) only.

    ``n`` and ``hidden`` may be SymInts (the op traced with dynamic shapes): the block sizes
    come from :func:`pow2_bucket`, never from a cache keyed on them.
    """
    if interpreting() and not FORCE_GPU_BLOCKS:
        # Fewer, larger programs: the interpreter's cost is per program and per op.
        return pow2_bucket(n, 16, 128), pow2_bucket(hidden, 16, 256), 256, 1
    # On a GPU BLOCK_M does not depend on n: a block size per row count compiled a new variant
    # whenever compaction moved n into another power of two (the cold start of a process). For
    # few rows the head is bound by reading W_p, which a 64-row tile does not change.
    if dot_fp32:
        # The fp32 (IEEE) dot holds its operands in registers: 64-wide k tiles on 4 warps
        # spilled on sm_80 (255 registers, 544-byte stack; make triton-check). Half the k tile
        # on twice the warps: 80 registers on sm_80, 112 on sm_90, no stack.
        return 64, 64, 32, 8
    return 64, 64, 64, 4


def _num_tiles(width) -> int:
    """Column tiles of the first Linear's ``width`` outputs: the partial logits' first dimension."""
    return cdiv(width, _head_blocks(1, width)[1])


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _run_head(
    wrap,
    cls_hidden,
    pooler_weight,
    pooler_bias,
    head_weight,
    want_pooled: bool,
    placeholders: bool,
    gelu: bool = False,
):
    """Allocate and launch the head: ``(partial logits [T, n, C] fp32, pooled [n, M] or None)``.

    ``cls_hidden`` [n, H], ``pooler_weight`` [M, H], ``pooler_bias`` [M], ``head_weight`` [C, M];
    ``gelu``: GELU instead of tanh after the first Linear. ``wrap`` is
    :func:`torch.library.wrap_triton` inside the registered op, the identity otherwise; with
    ``placeholders`` an output not asked for is an empty tensor, not None.
    """
    n, hidden = cls_hidden.shape
    width = pooler_weight.shape[0]
    num_labels = head_weight.shape[0]
    device = cls_hidden.device
    tiles = _num_tiles(width)
    zpart = new_empty((tiles, n, num_labels), torch.float32, device)
    if want_pooled:
        pooled = new_empty((n, width), cls_hidden.dtype, device)
    else:
        pooled = new_empty((0, width), cls_hidden.dtype, device) if placeholders else None
    if n == 0:
        return zpart, pooled
    block_m, block_n, block_k, warps = _head_blocks(n, width, _dot_fp32(cls_hidden.dtype))
    with device_guard(cls_hidden):
        wrap(_head_kernel)[(cdiv(n, block_m), tiles)](
            cls_hidden,
            cls_hidden.stride(0),
            cls_hidden.stride(1),
            pooler_weight,
            pooler_weight.stride(0),
            pooler_weight.stride(1),
            pooler_bias,
            pooler_bias.stride(0),
            head_weight,
            head_weight.stride(0),
            head_weight.stride(1),
            pooled if want_pooled else zpart,
            zpart,
            n,
            hidden,
            width,
            num_labels,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_C=pow2_bucket(num_labels, 16),
            DOT_FP32=_dot_fp32(cls_hidden.dtype),
            WRITE_POOLED=want_pooled,
            GELU=gelu,
            num_warps=warps,
        )
    return zpart, pooled
