"""The continuous engine's hidden states in flight: a paged token pool.

A sequence in flight owns a slot; its hidden states live in pages of ``page_size`` tokens of
one pool ``[pages x page_size, H]``, so memory follows the tokens in flight, not
``slots x max_length``. Page 0 holds two tokens no sequence owns: ``NULL`` (always zero) and
``SCRATCH`` (written, never read). On the host: each slot's page table and length.

A layer call's rows are gathered into ``[m, padded_length, H]`` (pad positions zero) with
their mask, each row from the pool or from an earlier call's output that the engine kept, and
a call's output rows are written back. Two implementations, same results:

- ``torch.ops.earlyexit.cpp_pool_gather`` / ``cpp_pool_scatter`` (the C++ extension, CPU): one
  memcpy per page of a row;
- the reference, PyTorch index ops on a token index built on the host (any device):
  :func:`gather_reference`, :func:`scatter_reference`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["NULL", "SCRATCH", "TokenPool", "gather_reference", "scatter_reference"]

NULL, SCRATCH = 0, 1  # token rows of page 0: always zero (read by pad positions); written by rows not kept


def token_index(page_table: np.ndarray, lengths: np.ndarray, page_size: int, slots, padded_length: int):
    """Pool rows of each slot's first ``padded_length`` positions [m, S] (``NULL`` past its
    length), and which positions are valid [m, S]."""
    pages = page_table[slots, : math.ceil(padded_length / page_size)]
    offsets = np.arange(page_size, dtype=np.int64)
    index = (pages[:, :, None] * page_size + offsets).reshape(len(slots), -1)[:, :padded_length]
    valid = np.arange(padded_length) < lengths[slots][:, None]
    return np.where(valid, index, NULL), valid


def gather_reference(
    pool: torch.Tensor,
    page_table: np.ndarray,
    lengths: np.ndarray,
    page_size: int,
    slots: list[int],
    padded_length: int,
    residents: list[torch.Tensor] = (),
    resident_of: list[int] | None = None,
    row_of: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``slots`` of the pool ``[T, H]`` (its row ``NULL`` zero) as ``[m, padded_length, H]``
    (zero past each slot's length) and their mask ``[m, padded_length]`` (bool); where
    ``resident_of[i] >= 0``, row ``i`` is row ``row_of[i]`` of ``residents[resident_of[i]]``
    ``[r, S', H]`` instead (its slot's positions, zero after)."""
    index, valid = token_index(page_table, lengths, page_size, slots, padded_length)
    read = torch.from_numpy(index.reshape(-1)).to(pool.device, non_blocking=True)
    hidden = pool.index_select(0, read).view(len(slots), padded_length, -1)  # pad positions read NULL
    mask = torch.from_numpy(valid).to(pool.device)
    for source, resident in enumerate(residents):
        rows = [i for i, of in enumerate(resident_of or ()) if of == source]
        if rows:
            width = min(padded_length, resident.shape[1])
            taken = resident[[row_of[i] for i in rows], :width].masked_fill(~mask[rows, :width, None], 0)
            hidden[rows, :width] = taken
            hidden[rows, width:] = 0
    return hidden, mask


def scatter_reference(
    pool: torch.Tensor, page_table: np.ndarray, lengths: np.ndarray, page_size: int, slots: list[int], hidden
) -> None:
    """Write each row ``i`` of ``hidden`` ``[m, S, H]`` with ``slots[i] >= 0`` to its slot's
    positions in the pool (rows with ``slots[i] = -1`` are not written)."""
    kept = [max(slot, 0) for slot in slots]
    index, valid = token_index(page_table, lengths, page_size, kept, hidden.shape[1])
    valid &= (np.asarray(slots) >= 0)[:, None]
    write = torch.from_numpy(np.where(valid, index, SCRATCH).reshape(-1)).to(pool.device)
    pool.index_copy_(0, write, hidden.reshape(-1, hidden.shape[-1]))


class TokenPool:
    """Hidden states of ``slots`` sequences of at most ``max_length`` tokens, paged.

    ``fast``: use the C++ operators (CPU pools only, where the extension is loaded); otherwise
    the reference index ops. ``lengths`` [slots] (int64, host) is the engine's to set when a
    slot is taken; a slot of length 0 gathers as all padding.
    """

    def __init__(self, slots: int, max_length: int, hidden_size: int, dtype, device, fast: bool, page_size: int = 16):
        self.page_size = page_size
        self.pages_per_slot = math.ceil(max_length / page_size)
        self.page_table = np.zeros((slots, self.pages_per_slot), dtype=np.int64)
        self.lengths = np.zeros(slots, dtype=np.int64)
        # Page 0 holds NULL and SCRATCH; sequences' pages are added on demand.
        self.pool = torch.zeros(page_size, hidden_size, dtype=dtype, device=device)
        self._free_pages: list[int] = []
        self._pages_of: list[list[int]] = [[] for _ in range(slots)]  # each slot's pages, as the table holds them
        self.fast = fast and self.pool.device.type == "cpu"
        # The host tables seen as tensors (same memory) by the C++ operators.
        self._page_table_t = torch.from_numpy(self.page_table)
        self._lengths_t = torch.from_numpy(self.lengths)

    def take(self, slots: list[int], lengths: np.ndarray) -> None:
        """Give ``slots`` pages for ``lengths`` tokens each (one growth of the pool at most)."""
        counts = -(-lengths // self.page_size)
        pages = self._allocate(int(counts.sum()))
        table = np.full((len(slots), self.pages_per_slot), NULL, dtype=np.int64)
        table[np.arange(self.pages_per_slot) < counts[:, None]] = pages
        self.page_table[slots] = table
        self.lengths[slots] = lengths
        for slot, count, first in zip(slots, counts.tolist(), np.cumsum(counts).tolist()):
            self._pages_of[slot] = pages[first - count : first]

    def release(self, slots: list[int]) -> None:
        """Return the slots' pages."""
        for slot in slots:
            self._free_pages += self._pages_of[slot]

    def gather(self, slots: list[int], padded_length: int, residents=(), resident_of=None, row_of=None):
        """Rows ``slots`` as ``[m, padded_length, H]`` and their mask; see :func:`gather_reference`."""
        if not self.fast:
            args = (self.pool, self.page_table, self.lengths, self.page_size, slots, padded_length)
            return gather_reference(*args, residents, resident_of, row_of)
        return torch.ops.earlyexit.cpp_pool_gather.default(
            self.pool,
            self._page_table_t,
            self._lengths_t,
            self.page_size,
            slots,
            padded_length,
            [resident.contiguous() for resident in residents],
            resident_of or [],
            row_of or [],
        )

    def scatter(self, slots: list[int], hidden: torch.Tensor) -> None:
        """Write rows of ``hidden`` ``[m, S, H]`` to their slots (``-1``: not written); see :func:`scatter_reference`."""
        if not self.fast:
            scatter_reference(self.pool, self.page_table, self.lengths, self.page_size, slots, hidden)
            return
        torch.ops.earlyexit.cpp_pool_scatter.default(
            self.pool, self._page_table_t, self._lengths_t, self.page_size, slots, hidden.contiguous()
        )

    def _allocate(self, count: int) -> list[int]:
        if len(self._free_pages) < count:
            pages_now = self.pool.shape[0] // self.page_size
            grow = max(count - len(self._free_pages), pages_now)  # at least double: amortised copies
            # Uninitialised: a page is read only at the positions its sequence wrote (others read NULL).
            pool = torch.empty(
                (pages_now + grow) * self.page_size, self.pool.shape[1], dtype=self.pool.dtype, device=self.pool.device
            )
            pool[: self.pool.shape[0]] = self.pool
            self.pool = pool
            self._free_pages.extend(range(pages_now + grow - 1, pages_now - 1, -1))
        pages = self._free_pages[len(self._free_pages) - count :]
        del self._free_pages[len(self._free_pages) - count :]
        return pages
