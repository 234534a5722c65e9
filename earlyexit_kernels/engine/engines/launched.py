"""What the GPU's launched engines share (the cohort engine, :mod:`.cohort_engine`; the segment engine,
:mod:`.segments`): how many pending sequences a cohort takes under its token budget, its inputs built on
the host and copied to the device at once, and its outputs copied back without a wait.

The engines' shared members (admission, the device copy, the policy swap) are
:class:`~earlyexit_kernels.engine.stream.stream_surface.LaunchedStream`'s; these are the functions and
defaults around a cohort that both engines call.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "COHORT_TOKENS",
    "COHORT_ROWS",
    "COHORTS_IN_FLIGHT",
    "cohort_inputs",
    "cohort_limits",
    "cohort_size",
    "copy_to_host",
]

# A cohort's token budget (rows x padded length) where none is given: text-embeddings-inference's
# --max-batch-tokens default, which fills an H100 with BERT-base at these lengths.
COHORT_TOKENS = 16384
# Most rows of a cohort where max_batch_size is None: a bound on the buckets (and graphs) a
# cohort of very short texts would need.
COHORT_ROWS = 1024
# Cohorts launched and not read back: the GPU runs the newest while the host reads the oldest.
COHORTS_IN_FLIGHT = 2


def cohort_limits(config) -> tuple[int, int]:
    """A launched engine's most rows and most padded tokens per call: ``config``'s ``max_batch_size`` and
    ``max_tokens``, ``COHORT_ROWS`` and ``COHORT_TOKENS`` where None."""
    rows = COHORT_ROWS if config.max_batch_size is None else config.max_batch_size
    tokens = COHORT_TOKENS if config.max_tokens is None else config.max_tokens
    return rows, tokens


def cohort_size(lengths: list[int], max_rows: int, max_tokens: int, length_step: int) -> int:
    """How many of ``lengths`` (the next pending sequences, in the order they would be taken) one
    cohort holds: the most that fit ``max_rows`` rows and ``max_tokens`` tokens, padded to the longest
    rounded up to a multiple of ``length_step``; at least one (a sequence longer than the budget runs
    alone)."""
    longest = 0
    for count, length in enumerate(lengths, 1):
        longest = max(longest, length)
        padded = -(-longest // length_step) * length_step
        if count > max_rows or count * padded > max_tokens:
            return max(count - 1, 1)
    return len(lengths)


def copy_to_host(outputs: tuple, *, pin: bool) -> list[torch.Tensor]:
    """Host copies of ``outputs`` (device tensors), queued without a wait (``pin``: into pinned memory, as
    the GPU's copies must be). Where they are views of one buffer (the graphed step packs its logits, exit
    layers and layers run so), the buffer is copied once and the same views are made of the copy."""
    storage = outputs[0].untyped_storage()
    if all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in outputs):
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
        source = torch.empty(0, dtype=torch.uint8, device=outputs[0].device).set_(storage)
        host.copy_(source, non_blocking=pin)
        return [
            torch.empty(0, dtype=t.dtype).set_(host.untyped_storage(), t.storage_offset(), t.shape, t.stride())
            for t in outputs
        ]
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in outputs]
    for host, tensor in zip(copies, outputs):
        host.copy_(tensor, non_blocking=pin)
    return copies


def cohort_inputs(engine, entries: list[tuple]) -> tuple:
    """A cohort's ``(lengths, hidden, mask, summary)`` from pending ``entries`` (:class:`PendingQueue`'s):
    each row's length (host, int64), the embeddings [B, S, H] and mask [B, S] on ``engine``'s device and the
    mask's summary ``(extents on the device, longest, padded count)``, known on the host. The ids, mask,
    types (where given) and lengths are built in one host array and copied at once (``engine.to_device``),
    so nothing is read back before the first layer."""
    lengths = np.fromiter((entry[0] for entry in entries), dtype=np.int64, count=len(entries))
    rows, longest = len(entries), int(lengths.max())
    typed = any(entry[4] is not None for entry in entries)
    planes = 3 if typed else 2
    block = np.zeros(planes * rows * longest + rows, dtype=np.int64)
    grids = block[: planes * rows * longest].reshape(planes, rows, longest)
    valid = np.arange(longest) < lengths[:, None]
    grids[0].fill(engine.pad_token_id)
    grids[0][valid] = np.concatenate([entry[3] for entry in entries])
    grids[1][valid] = 1
    if typed:
        grids[2][valid] = np.concatenate([e[4] if e[4] is not None else np.zeros_like(e[3]) for e in entries])
    block[planes * rows * longest :] = lengths
    on_device = engine.to_device(block)
    ids_d, mask_d, *types_d = on_device[: planes * rows * longest].view(planes, rows, longest).unbind(0)
    summary = (on_device[planes * rows * longest :], longest, int(rows * longest - lengths.sum()))
    hidden = engine.adapter.embed(ids_d, types_d[0] if typed else None, None, None, mask_d)
    return lengths, hidden, mask_d, summary
