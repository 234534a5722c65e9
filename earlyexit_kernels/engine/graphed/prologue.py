"""The graphed step's prologue: the inputs' summary and the embeddings in one graph per input shape.

On a GPU the graphed step's layers run back to back once the first layer graph is launched, but
before it the eager prologue (the inputs' summary and its read-back, the model's embeddings, the
static batch's load) launched 33-34 kernels and copies one by one, and an H100 idled 1.4-2.4 ms
a forward in it against 0.27 ms for the plain model captured whole (docs/benchmarks.md, the fourth
GPU session). Here the summary and the embeddings are one step on fixed buffers, captured once per
input shape (:class:`~earlyexit_kernels.engine.graphed.step_graphs.StepGraphs`) and replayed: a forward
copies its inputs into the buffers, replays, and reads the summary back once.

The summary is read after the embeddings, not before: the embedding runs on the ids clamped into
the vocabulary, so that an id out of range reaches no gather kernel (a device-side assert there
would end the CUDA context), and the read-back that follows raises the same error as the eager
prologue, naming the range found. On the CPU the same step runs uncaptured and gives the eager
prologue's bits.

Before the first layer graph a forward then launches three things and reads back once: one copy of
its inputs into the buffers (``torch._foreach_copy_``, one kernel for inputs of one dtype), this
graph, the read-back, and the static batch's load graph, which reads this prologue's buffers (its
embeddings, mask and row extents: nothing is computed twice) at the length the summary gave
(:mod:`~earlyexit_kernels.engine.graphed.static_step`). Each prologue has a serial number, which keys the
load graphs that read its buffers: a prologue made again for the same shape has new buffers, and
the graphs of one no longer kept are dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import torch

from earlyexit_kernels.backends.compaction import valid_extent
from earlyexit_kernels.engine.graphed import step_graphs
from earlyexit_kernels.engine.graphed.step_graphs import GraphStats, StepGraphs
from earlyexit_kernels.engine.step.inputs import check_id_range

__all__ = ["Prologue", "Prologues", "eligible"]

# Input shapes whose prologue buffers and graph are kept, the most recent first.
KEPT_PROLOGUES = 4
_SERIALS = itertools.count(1)


def eligible(input_ids, inputs_embeds) -> bool:
    """Whether a forward's inputs take the graphed prologue: ids given (not embeddings) and a batch."""
    return inputs_embeds is None and input_ids is not None and input_ids.dim() == 2 and input_ids.shape[0] > 0


class Prologue:
    """The fixed buffers of one input shape and the step that reads them: ``ids``, ``mask``,
    ``types`` and ``positions`` [B, S] (each None where the forward does not give it), ``summary``
    (int64: the ids' lowest and highest, then with a mask its longest extent and padded count),
    ``extents`` [B] (with a mask) and ``hidden`` [B, S, H], the embeddings' output, set by the step."""

    def __init__(self, adapter, input_ids, attention_mask, token_type_ids, position_ids, stats: GraphStats):
        def like(tensor):
            return None if tensor is None else torch.zeros_like(tensor, memory_format=torch.contiguous_format)

        self.adapter = adapter
        self.serial = next(_SERIALS)  # keys the load graphs that read these buffers
        self.ids, self.mask = like(input_ids), like(attention_mask)
        self.types, self.positions = like(token_type_ids), like(position_ids)
        if self.mask is not None:
            self.mask.fill_(1)  # the warm-up's first run sees a whole mask, never an empty one
        self.summary = torch.zeros(4 if self.mask is not None else 2, dtype=torch.long, device=input_ids.device)
        self.extents = None
        self.hidden = None
        self.graphs = StepGraphs(input_ids.device, stats)
        # One forward at a time on these buffers, from its inputs' copy until the static batch has
        # taken its embeddings; on a GPU the next forward (maybe another thread's, on another stream)
        # waits for ``done``, recorded once that copy is enqueued.
        self.lock = threading.Lock()
        self.done = torch.cuda.Event() if input_ids.device.type == "cuda" else None
        self.done_recorded = False

    def _step(self) -> None:
        """The summary and the embeddings from the buffers: no host read, fixed shapes, so a graph replays it."""
        ids, mask = self.ids, self.mask
        values = [ids.min(), ids.max()]
        if mask is not None:
            extents = valid_extent(mask)
            # a row with no attended token keeps the full length (batch_loop.mask_extents)
            self.extents = torch.where(extents > 0, extents, mask.shape[1])
            values += [self.extents.max(), (mask == 0).sum()]
        torch.stack([v.to(torch.long) for v in values], out=self.summary)
        clamped = ids.clamp(0, self.adapter.vocab_size - 1)
        self.hidden = self.adapter.embed(clamped, self.types, self.positions, None, mask)

    def run(self, input_ids, attention_mask, token_type_ids, position_ids, capture: bool) -> tuple:
        """Load a forward's inputs, run the step (replayed where captured) and read the summary back
        once. Returns ``(hidden, mask, mask_summary or None)`` as the eager prologue gives them, each
        one of this shape's buffers (valid until the next forward of this shape): the embeddings, the
        mask and the summary ``(extents, longest, padded)``."""
        buffers, given = [], []
        for buffer, tensor in (
            (self.ids, input_ids),
            (self.mask, attention_mask),
            (self.types, token_type_ids),
            (self.positions, position_ids),
        ):
            if buffer is not None:
                buffers.append(buffer)
                given.append(tensor)
        torch._foreach_copy_(buffers, given)  # one kernel where the inputs share a dtype and device
        step_graphs.run_step(self.graphs, ("prologue",), self._step, capture)
        read = self.summary.tolist()
        check_id_range(read[0], read[1], self.adapter.vocab_size)
        summary = None if self.mask is None else (self.extents, int(read[2]), int(read[3]))
        return self.hidden, self.mask, summary


class Prologues:
    """A patched model's prologues, by input shape, the most recently used first (at most
    :data:`KEPT_PROLOGUES`). ``stats``: where their captures, replays and fallbacks are counted
    (the static batches' own, so that a benchmark row's counts hold the prologue's too)."""

    def __init__(self, stats: GraphStats | None = None):
        self._kept: dict[tuple, Prologue] = {}
        self._lock = threading.Lock()  # the lookup, from any thread (each prologue has its own lock for its use)
        self.stats = stats if stats is not None else GraphStats()

    @contextlib.contextmanager
    def run(self, adapter, input_ids, attention_mask, token_type_ids, position_ids, *, capture: bool):
        """``(hidden, mask, mask_summary, serial)`` of a forward's inputs through its shape's prologue
        (made at its first use), held until the ``with`` block ends: the block hands them to the graphed
        step, whose load step reads them into its static batch (captured, keyed by ``serial``)."""

        def spec(tensor):
            return None if tensor is None else (tuple(tensor.shape), tensor.dtype)

        key = (id(adapter), str(input_ids.device))
        key += tuple(spec(t) for t in (input_ids, attention_mask, token_type_ids, position_ids))
        with self._lock:
            prologue = self._kept.pop(key, None)
            if prologue is None:
                # Normal tensors even under inference_mode(), as the static batches' (written in place later).
                with torch.inference_mode(False):
                    prologue = Prologue(adapter, input_ids, attention_mask, token_type_ids, position_ids, self.stats)
            self._kept[key] = prologue
            while len(self._kept) > KEPT_PROLOGUES:
                self._kept.pop(next(iter(self._kept)))
        with prologue.lock:
            if prologue.done_recorded:
                torch.cuda.current_stream(input_ids.device).wait_event(prologue.done)
            yield (*prologue.run(input_ids, attention_mask, token_type_ids, position_ids, capture), prologue.serial)
            if prologue.done is not None:
                prologue.done.record()
                prologue.done_recorded = True

    def serials(self) -> set[int]:
        """The serials of the prologues kept: a load graph keyed by another reads buffers that are gone."""
        with self._lock:
            return {prologue.serial for prologue in self._kept.values()}

    def clear(self) -> None:
        self._kept.clear()
