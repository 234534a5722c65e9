"""Batch compaction in plain PyTorch: keep the surviving rows, trim padding nobody needs.

The reference for the fast gather kernels. Everything here runs on the device
without a host sync once the number of survivors is known.
"""

from __future__ import annotations

import torch

__all__ = ["survivor_index", "compact", "layer_attention_mask", "valid_extent"]


def survivor_index(keep: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of ``keep`` [n] in increasing (stable) order, [count] int64.

    ``count`` must be ``keep.sum()``, already read on the host, so no second sync happens.
    """
    if hasattr(torch, "nonzero_static"):
        return torch.nonzero_static(keep, size=count).squeeze(1)
    return torch.argsort((~keep).to(torch.int8), stable=True)[:count]


def compact(
    hidden: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather rows ``index`` of ``hidden`` [n, S, H] and ``mask`` [n, S] and keep the first ``seq_len`` positions.

    Returns a contiguous ``[m, seq_len, H]`` tensor and the ``[m, seq_len]`` mask (or ``None``).
    """
    hidden = hidden.index_select(0, index)
    if mask is not None:
        mask = mask.index_select(0, index)
    return trim(hidden, mask, seq_len)


def trim(hidden: torch.Tensor, mask: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the first ``seq_len`` positions of ``hidden`` [n, S, H] and ``mask`` [n, S]."""
    if seq_len < hidden.shape[1]:
        hidden = hidden[:, :seq_len].contiguous()
        if mask is not None:
            mask = mask[:, :seq_len].contiguous()
    return hidden, mask


def valid_extent(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D 0/1 mask [n, S]: one past the last attended position, int64 [n] (0 if none)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def layer_attention_mask(
    mask: torch.Tensor | None, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The 4-D mask a Hugging Face encoder layer expects, built from the 2-D mask [n, S].

    The same values as ``transformers.masking_utils.create_bidirectional_mask``: an additive
    float mask (0 or the dtype's minimum) for eager attention, a boolean one for SDPA,
    broadcast as ``[n, 1, S, S]`` without materialising the square.
    """
    if mask is None:
        return None
    n, s = mask.shape
    allowed = mask.bool()[:, None, None, :]
    if attn_implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        return additive.expand(n, 1, s, s)
    return allowed.expand(n, 1, s, s)
