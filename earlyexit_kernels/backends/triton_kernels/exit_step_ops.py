"""The Triton exit step's launchers registered with ``torch.library``: ``earlyexit::pool_norm``,
``earlyexit::exit_head`` and ``earlyexit::exit_decide``, with their fake (meta) kernels.

Eager calls launch the kernels directly (:mod:`.exit_step`); these ops are what runs under
``torch.compile`` and under any dispatch mode (fake tensors, ``make_fx``, op counting), which
must see one op per launch.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from earlyexit_kernels.backends.triton_kernels._common import register_op
from earlyexit_kernels.backends.triton_kernels.exit_decide import F_PARTIALS, _decide_outputs, _run_decide
from earlyexit_kernels.backends.triton_kernels.exit_head import _num_tiles, _run_head
from earlyexit_kernels.backends.triton_kernels.pool_norm import _run_pool_norm


@register_op("earlyexit::pool_norm", mutates_args=())
def pool_norm(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    mean: bool,
) -> torch.Tensor:
    """The rows an exit head reads [n, H]: the [CLS] vector or the masked mean of ``hidden``
    [n, S, H], then the LayerNorm when its weights are given."""
    return _run_pool_norm(wrap_triton, hidden, mask, norm_weight, norm_bias, eps, mean)


@pool_norm.register_fake
def _pool_norm_fake(hidden, mask, norm_weight, norm_bias, eps, mean):
    return hidden.new_empty((hidden.shape[0], hidden.shape[2]))


@register_op("earlyexit::exit_head", mutates_args=())
def exit_head(
    cls_hidden: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    head_weight: torch.Tensor,
    want_pooled: bool,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial logits [T, n, C] fp32, pooled [n, M] or [0, M])`` of a head's two Linear layers
    (tanh after the first, or GELU with ``gelu``)."""
    return _run_head(wrap_triton, cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled, True, gelu)


@exit_head.register_fake
def _exit_head_fake(cls_hidden, pooler_weight, pooler_bias, head_weight, want_pooled, gelu=False):
    n = cls_hidden.shape[0]
    width = pooler_weight.shape[0]
    zpart = cls_hidden.new_empty((_num_tiles(width), n, head_weight.shape[0]), dtype=torch.float32)
    pooled = cls_hidden.new_empty((n if want_pooled else 0, width))
    return zpart, pooled


@register_op("earlyexit::exit_decide", mutates_args=("out_logits", "out_exit_layer", "out_layers_run"))
def exit_decide(
    src: torch.Tensor,
    head_bias: torch.Tensor | None,
    halting: torch.Tensor | None,
    s0: torch.Tensor | None,
    s1: torch.Tensor | None,
    aux: torch.Tensor | None,
    rows: torch.Tensor | None,
    runs: torch.Tensor | None,
    extents: torch.Tensor | None,
    out_logits: torch.Tensor,
    out_exit_layer: torch.Tensor,
    out_layers_run: torch.Tensor,
    code: int,
    layer: int,
    num_layers: int,
    fa: float,
    fb: float,
    int_param: int,
    flags: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's decision on logits ``src`` [n, C] (or partial logits [T, n, C] plus ``head_bias``).

    ``s0``, ``s1``: the policy's state in the kernel's two slots (``_SLOTS``); ``aux``:
    Scheduled's exit layers or stochastic QExit's uniforms; ``fa``, ``fb``, ``int_param``:
    the policy's parameters at this layer (see ``_decide_kernel``); ``flags``: ``F_*`` bits.

    Returns ``(exits, returned, logits, s0, s1, order, stats)``; outputs the flags do not
    ask for (``F_RETURNED``, ``F_LOGITS``, ``F_WRITE_BACK``) and unused state slots have 0
    rows. ``stats`` is ``(count, longest extent of a staying row)``, the extent 0 without
    ``extents``; ``order[:count]`` are the staying rows in increasing order, the rest the
    exiting rows in decreasing order.

    With ``F_WRITE_BACK`` the exiting rows' returned logits, ``layer`` and ``runs`` go to
    ``out_logits`` [B, C], ``out_exit_layer`` [B] and ``out_layers_run`` [B] at positions
    ``rows`` (the outputs may be empty otherwise).
    """
    return _run_decide(
        wrap_triton,
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
        code,
        layer,
        num_layers,
        fa,
        fb,
        int_param,
        flags,
        True,
    )


@exit_decide.register_fake
def _exit_decide_fake(
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
    code,
    layer,
    num_layers,
    fa,
    fb,
    int_param,
    flags,
):
    n, num_labels = src.shape[-2], src.shape[-1]
    logits_dtype = head_bias.dtype if (flags & F_PARTIALS) else torch.float32
    return _decide_outputs(
        n, num_labels, code, flags, logits_dtype, lambda shape, dtype: src.new_empty(shape, dtype=dtype), True
    )
