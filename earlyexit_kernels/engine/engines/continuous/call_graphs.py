"""The continuous engine's layer calls as static steps, each (layer, rows, length) captured in a CUDA graph.

A layer call of :class:`~earlyexit_kernels.engine.engines.continuous.engine.ContinuousEngine` takes its rows and
length from fixed sets (:class:`~earlyexit_kernels.engine.engines.continuous.shape_buckets.ShapeBuckets`, as for
``compile``), so the same shapes come back call after call. With the model patched for the
graphed step (``eek.patch(..., step="graphed")``, the default on CUDA) each call copies its
gathered rows into fixed input buffers and runs one step (the layer, the exit head and the
policy's decision), writing fixed output buffers: captured once per (layer, rows, length) on
CUDA (:mod:`earlyexit_kernels.engine.graphed.step_graphs`) and replayed, so a call launches one graph
instead of the layer's and the head's kernels one by one. On the CPU the same step runs
uncaptured.

Every shape's buffers are views of one allocation of the largest call (``max_batch_size`` rows
of ``max_length`` positions), so graphs of every shape share it. The step reads only the input
buffers and writes only the output buffers: running it again gives the same outputs (the
warm-up before a capture). The outputs are read before the next call overwrites them: the call's
one read-back, the state's write-back and the scatter of the hidden states to the token pool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from earlyexit_kernels.engine.graphed.step_graphs import StepGraphs

__all__ = ["StaticCalls"]


class StaticCalls:
    """Fixed input and output buffers for layer calls of at most ``rows x length`` positions."""

    def __init__(
        self,
        *,
        rows: int,
        length: int,
        hidden_size: int,
        num_labels: int,
        dtype: torch.dtype,
        wide: torch.dtype,
        device: torch.device,
        state: dict[str, torch.Tensor],
        capture: bool,
    ):
        positions = rows * length
        self.rows, self.length, self.hidden_size = rows, length, hidden_size
        self.hidden_in = torch.zeros(positions * hidden_size, dtype=dtype, device=device)
        self.hidden_out = torch.zeros(positions * hidden_size, dtype=dtype, device=device)
        self.mask = torch.ones(positions, dtype=torch.bool, device=device)  # the token pool's
        self.state_in = {k: torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, device=device) for k, v in state.items()}
        self.state_out = {k: torch.zeros_like(v) for k, v in self.state_in.items()}
        self.exits = torch.zeros(rows, dtype=torch.bool, device=device)
        self.returned = torch.zeros(rows, num_labels, dtype=wide, device=device)
        self.graphs = StepGraphs(device) if capture else None

    def run(
        self,
        layer: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        state: dict[str, torch.Tensor],
        step: Callable,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One call of ``layer`` on ``hidden`` [n, S, H] with its 2-D ``mask`` [n, S] and ``state``
        (rows first): ``step(layer, hidden, mask, state) -> (hidden, exits, returned, state)`` runs
        on the buffers. Returns the output buffers' views, valid until the next call (on the CPU the
        returned logits, which the rows that exit keep, copied)."""
        n, length, _ = hidden.shape
        if n > self.rows or length > self.length:
            raise ValueError(f"a call of {n} x {length} positions exceeds the buffers' {self.rows} x {self.length}")
        views = self._views(n, length)
        views["hidden_in"].copy_(hidden)
        views["mask"].copy_(mask)
        for k, v in state.items():
            self.state_in[k][:n].copy_(v)

        def static_step():
            out, exits, returned, new_state = step(layer, views["hidden_in"], views["mask"], views["state_in"])
            views["hidden_out"].copy_(out)
            self.exits[:n].copy_(exits)
            self.returned[:n].copy_(returned)
            for k, v in new_state.items():
                self.state_out[k][:n].copy_(v)

        if self.graphs is not None:
            self.graphs.run((layer, n, length), static_step)
        else:
            static_step()
        return (
            views["hidden_out"],
            self.exits[:n],
            # the CPU's rows that exit keep views of these logits past the call; a GPU's read them back first
            self.returned[:n].clone() if self.returned.device.type == "cpu" else self.returned[:n],
            {k: v[:n] for k, v in self.state_out.items()},
        )

    def _views(self, n: int, length: int) -> dict:
        """The buffers as one call's contiguous tensors (the same storage for every shape)."""
        positions = n * length
        shape = (n, length, self.hidden_size)
        return {
            "hidden_in": self.hidden_in[: positions * self.hidden_size].view(shape),
            "hidden_out": self.hidden_out[: positions * self.hidden_size].view(shape),
            "mask": self.mask[:positions].view(n, length),
            "state_in": {k: v[:n] for k, v in self.state_in.items()},
        }
