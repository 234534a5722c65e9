"""The Triton kernel that pools each row of a layer's output for an exit head, and its launcher.

``_pool_norm_kernel``: one program per row of ``hidden`` [n, S, H] (any strides). It takes the
[CLS] vector or the mean of the row's valid token vectors (``mask`` [n, S], nonzero where
valid; padding is never read, a row without a valid token gives zeros), summed in fp32 in
token order and rounded to the input dtype as
:func:`~earlyexit_kernels.backends.pooled_head.masked_mean` returns it; then, optionally, the MLP
head's LayerNorm in fp32 (two passes over the row, biased variance), rounded to the input dtype.
The result [n, H] is what the head kernel (:mod:`.exit_head`) reads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from earlyexit_kernels.backends.triton_kernels._common import device_guard, interpreting, new_empty, pow2_bucket

# Integer arguments that change from call to call: never specialized (see exit_step's docstring).
POOL_PER_CALL = ("S", "stride_hn", "stride_hs", "stride_mn")


@triton.jit(do_not_specialize=POOL_PER_CALL)
def _pool_norm_kernel(
    h_ptr,
    stride_hn,
    stride_hs,
    stride_hh,
    mask_ptr,
    stride_mn,
    stride_ms,
    nw_ptr,
    nb_ptr,
    out_ptr,
    S,
    H,
    eps,
    MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < H
    base = h_ptr + row * stride_hn
    if MEAN:
        total = tl.zeros((BLOCK_H,), dtype=tl.float32)
        valid_count = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            valid = ss < S
            if HAS_MASK:
                m = tl.load(mask_ptr + row * stride_mn + ss * stride_ms, mask=valid, other=0)
                valid = valid & (m != 0)
            x = tl.load(
                base + ss.to(tl.int64)[:, None] * stride_hs + hs[None, :] * stride_hh,
                mask=valid[:, None] & h_ok[None, :],
                other=0.0,
            )
            total += tl.sum(x.to(tl.float32), axis=0)
            valid_count += valid.to(tl.float32)
        pooled = total / tl.maximum(tl.sum(valid_count, axis=0), 1.0)
    else:
        pooled = tl.load(base + hs * stride_hh, mask=h_ok, other=0.0).to(tl.float32)
    pooled = pooled.to(out_ptr.dtype.element_ty).to(tl.float32)
    if NORM:
        mean = tl.sum(pooled, axis=0) / H
        centred = tl.where(h_ok, pooled - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / H + eps)
        weight = tl.load(nw_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
        bias = tl.load(nb_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)
        pooled = centred * rstd * weight + bias
    tl.store(out_ptr + row * H + hs, pooled.to(out_ptr.dtype.element_ty), mask=h_ok)


def _pool_blocks(hidden) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_H, num_warps): the whole row of H in one block, BLOCK_S tokens at a time.

    On a GPU 8 tokens of up to 1024 features on 4 warps: 64 fp32 values per thread in the
    loaded tile (``make triton-check``: no spills at H = 768 and 1024).
    """
    block_h = pow2_bucket(hidden, 16)
    if interpreting():
        return 64, block_h, 1  # fewer, larger steps: the interpreter's cost is per op
    return (8 if block_h <= 1024 else 4), block_h, 4


def _run_pool_norm(wrap, hidden, mask, norm_weight, norm_bias, eps: float, mean: bool):
    """Allocate and launch: the pooled (and normalised) rows [n, H] in ``hidden``'s dtype.

    ``hidden`` [n, S, H]; ``mask`` [n, S] or None (every token valid; only read by the mean);
    ``norm_weight``, ``norm_bias`` [H] or both None. ``wrap`` as in :func:`.exit_head._run_head`.
    """
    n, length, width = hidden.shape
    out = new_empty((n, width), hidden.dtype, hidden.device)
    if n == 0:
        return out
    has_mask = mean and mask is not None
    norm = norm_weight is not None
    block_s, block_h, warps = _pool_blocks(width)
    with device_guard(hidden):
        wrap(_pool_norm_kernel)[(n,)](
            hidden,
            hidden.stride(0),
            hidden.stride(1),
            hidden.stride(2),
            mask if has_mask else hidden,
            mask.stride(0) if has_mask else 0,
            mask.stride(1) if has_mask else 0,
            norm_weight if norm else hidden,
            norm_bias if norm else hidden,
            out,
            length,
            width,
            float(eps),
            MEAN=mean,
            HAS_MASK=has_mask,
            NORM=norm,
            BLOCK_S=block_s,
            BLOCK_H=block_h,
            num_warps=warps,
        )
    return out
