"""Attention over packed tokens: each sequence's queries attend to its own keys, with no padding.

A batch of ``n`` sequences packed as ``t`` tokens (``[t, heads, d]``, sequence ``r`` at tokens
``cu[r]..cu[r + 1]``; tokens past ``cu[n]`` belong to no sequence) is described by a
:class:`TokenLayout`, built on the device from the sequences' lengths with no host read, so that
a step holding it can be captured in a CUDA graph. Two attentions read it:

- :func:`fused_attention`: ``torch.nn.attention.varlen.varlen_attn`` (flash attention's varlen
  kernel, CUDA, fp16 and bf16) where torch has it (2.10 and later) and the device takes it;
- :func:`grid_attention`: the tokens scattered onto a padded grid ``[n, longest]``, SDPA with the
  key mask, gathered back. The same shapes whatever the lengths and no host read either: the CPU's,
  a float32 GPU's, and the reference the fused kernel is tested against.

Tokens past ``cu[n]`` get zeros from the grid and whatever the fused kernel leaves: nothing reads
them (every token-wise operation is row by row, and the step drops them when it gathers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "TokenLayout",
    "token_layout",
    "fused_varlen_available",
    "fused_attention",
    "grid_attention",
    "attention_for",
]

FUSED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class TokenLayout:
    """Where each sequence's tokens sit in a packed batch: ``lengths`` [n] and ``cu`` [n + 1] (int64,
    ``cu[r]`` the first token of sequence ``r``), ``row`` [t] (each token's sequence, ``n`` past
    ``cu[n]``) and ``offset`` [t] (its position in its sequence), all on the device; ``longest`` (host):
    at least the longest length, the grid's and the fused kernel's bound."""

    lengths: torch.Tensor
    cu: torch.Tensor
    row: torch.Tensor
    offset: torch.Tensor
    longest: int

    @property
    def valid(self) -> torch.Tensor:
        """[t] bool: whether a token belongs to a sequence."""
        return self.row < self.lengths.shape[0]


def token_layout(lengths: torch.Tensor, tokens: int, longest: int) -> TokenLayout:
    """The layout of ``tokens`` packed positions holding sequences of ``lengths`` [n] (int64, on the
    device; zero-length sequences allowed, their sum at most ``tokens``), each at most ``longest``."""
    n = lengths.shape[0]
    cu = torch.zeros(n + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=cu[1:])
    index = torch.arange(tokens, device=lengths.device)
    # cu[r] <= index < cu[r + 1]: how many sequences end at or before the token
    row = torch.searchsorted(cu[1:], index, right=True)
    offset = index - cu[row]
    return TokenLayout(lengths, cu, row, offset, longest)


def fused_varlen_available(
    device: torch.device, dtype: torch.dtype | None = None, head_size: int | None = None
) -> bool:
    """Whether torch's varlen flash attention runs on ``device`` (CUDA, torch >= 2.10) for ``dtype`` (fp16 or
    bf16) and heads of ``head_size`` (None: whichever). Flash attention's kernels need an Ampere or later GPU
    (compute capability 8.0) and a head size that is a multiple of 8, at most 256; elsewhere the grid runs."""
    device = torch.device(device)
    if device.type != "cuda" or (dtype is not None and dtype not in FUSED_DTYPES):
        return False
    if head_size is not None and (head_size > 256 or head_size % 8):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def fused_attention(q, k, v, layout: TokenLayout, scale: float) -> torch.Tensor:
    """[t, heads, d]: flash attention's varlen kernel (see :func:`fused_varlen_available`)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = layout.cu.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, layout.longest, layout.longest, scale=scale)


def grid_attention(q, k, v, layout: TokenLayout, scale: float) -> torch.Tensor:
    """[t, heads, d]: each sequence's tokens placed on a padded grid [n, longest], SDPA with its keys
    masked to its length, and gathered back (zeros for tokens of no sequence)."""
    n, longest = layout.lengths.shape[0], layout.longest
    tokens, heads, size = q.shape
    # a token's slot on the grid; tokens of no sequence go to one dump slot past the grid
    slot = torch.where(layout.valid, layout.row * longest + layout.offset, n * longest)
    grid = q.new_zeros(3, n * longest + 1, heads, size)
    for part, x in zip(grid, (q, k, v)):
        part.index_copy_(0, slot, x)
    query, key, value = (part[: n * longest].view(n, longest, heads, size).transpose(1, 2) for part in grid)
    keys = torch.arange(longest, device=q.device) < layout.lengths[:, None]
    keys[:, 0] |= layout.lengths == 0  # an empty sequence attends to one zero key, not to none (NaN)
    mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=keys[:, None, None, :], scale=scale)
    mixed = torch.cat([mixed.transpose(1, 2).reshape(n * longest, heads, size), q.new_zeros(1, heads, size)])
    return mixed.index_select(0, slot)


def attention_for(device: torch.device, dtype: torch.dtype, head_size: int):
    """The packed attention a step on ``device`` in ``dtype`` with heads of ``head_size`` runs: the fused kernel
    where it can, else the grid."""
    return fused_attention if fused_varlen_available(device, dtype, head_size) else grid_attention
