"""The strongest unpatched peers on a GPU: the same model captured in a CUDA graph, and ``torch.compile``'d.

Early exit is compared with the unpatched model as Hugging Face runs it (``eager``), and on CUDA
also with what a user who cares about the launch floor would run instead of early exit:

- ``cuda-graphs``: the unpatched model's forward captured once in a ``torch.cuda.CUDAGraph`` on
  fixed input buffers (warmed up on a side stream first, as PyTorch's documentation does), then
  replayed; each call copies its inputs into the buffers, as a server must;
- ``compile-reduce-overhead``: ``torch.compile(model, mode="reduce-overhead")`` (Inductor's kernels
  in CUDA graphs, ``dynamic=False``: one graph per shape, the fastest a shape gets), compiled once
  per model and shape and warmed up before it is timed. It runs on a copy of the model made
  before any patching, so that patching and unpatching the measured model never trips a guard
  and recompiles it.

The captured peer gets the attention mask as a user's tokenizer gives it, all ones included: on an
H100 (bf16, BERT-base, B = 64, S = 128) its forward captured without a mask ran at 10.35 ms and with
an all-ones mask at 4.07 ms, the eager model at 5.17 ms (``gpu_session_report.py peer-capture``,
benchmarks/results/nvidia_h100_80gb_hbm3/gpu_session_2026-11-27b/). The compiled peer gets the mask
only where it masks something (Hugging Face drops an all-ones mask after reading it back, which a
compiled forward cannot do; not measured the other way on a GPU). The suite times whichever of them is faster as the peer its ratios are
taken against (``strongest_peer``, :mod:`.results`). Neither exists without CUDA:
:func:`unavailable` says why, and the suite writes that in the row.
"""

from __future__ import annotations

import copy

import torch

from earlyexit_kernels.bench.timing import synchronize
from earlyexit_kernels.engine.step_graphs import capture_stream

__all__ = ["PEERS", "PeerUnavailable", "unavailable", "PeerModels", "check_peer_names"]

PEERS = ("cuda-graphs", "compile-reduce-overhead")
_ALIASES = {"compile": "compile-reduce-overhead", "graphs": "cuda-graphs"}
#: how many shapes a sweep may compile before dynamo would fall back to eager (its default is 8)
_RECOMPILES = 64


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says why."""


def check_peer_names(names: list[str]) -> list[str]:
    """The peers named (``compile`` and ``graphs`` accepted for short), in :data:`PEERS` order."""
    chosen = set()
    for name in names:
        name = _ALIASES.get(name, name)
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)} (or none)")
        chosen.add(name)
    return [p for p in PEERS if p in chosen]


def unavailable(peer: str, device: torch.device) -> str | None:
    """Why ``peer`` cannot run on ``device``, or None where it can."""
    if device.type != "cuda":
        how = "its forward captured in a CUDA graph" if peer == "cuda-graphs" else "Inductor's kernels in CUDA graphs"
        return f"no CUDA device: {peer} is {how} (the model is on {device.type})"
    if peer == "compile-reduce-overhead":
        try:
            import triton  # noqa: F401 - Inductor's GPU kernels are Triton's
        except ImportError:
            return "torch.compile's GPU kernels need triton, which is not installed"
    return None


def _inputs(ids: torch.Tensor, mask: torch.Tensor, *, always_mask: bool = False) -> dict:
    padded = always_mask or bool((mask == 0).any())
    return {"input_ids": ids, "attention_mask": mask if padded else None}


class _Graphed:
    """The unpatched forward on fixed input buffers, captured in one CUDA graph; a call copies the
    inputs in and replays it."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask
        inputs = _inputs(ids, mask, always_mask=True)
        self.static = {k: None if v is None else v.clone() for k, v in inputs.items()}
        # The warm-up on the stream that captures, as the graphed step's: cuBLAS keeps a workspace
        # per (handle, stream), and a stream first met inside the capture gets it from the graph's
        # pool. (Not why this peer ran at half the eager model's speed on an H100: the warm-up on
        # a side stream timed the same, docs/development.md "What the second GPU session found".)
        stream = capture_stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(**self.static)
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=stream):
                self.out = model(**self.static)
        except Exception as err:  # noqa: BLE001 - whatever stops a capture is the reason the peer is missing
            torch.cuda.synchronize(ids.device)
            raise PeerUnavailable(f"the forward could not be captured: {type(err).__name__}: {err}") from err

    def __call__(self):
        self.static["input_ids"].copy_(self.ids)
        if self.static["attention_mask"] is not None:
            self.static["attention_mask"].copy_(self.mask)
        self.graph.replay()
        return self.out


class PeerModels:
    """The peers of one model, made on first use: what the suite's runner calls per configuration.

    ``model`` must be unpatched when this is made (the compiled peer copies it then) and when a
    ``cuda-graphs`` peer is captured.
    """

    def __init__(self, model):
        self.model = model
        self._compiled = None
        self._compile_error: str | None = None

    def runner(self, peer: str, ids: torch.Tensor, mask: torch.Tensor):
        """A no-argument callable running ``peer`` on ``ids``/``mask``, warmed up; raises :class:`PeerUnavailable`."""
        reason = unavailable(peer, ids.device)
        if reason is not None:
            raise PeerUnavailable(reason)
        if peer == "cuda-graphs":
            return _Graphed(self.model, ids, mask)
        compiled = self._compile()
        inputs = _inputs(ids, mask)

        def run():
            return compiled(**inputs)

        try:
            for _ in range(3):  # compile, then the CUDA graph trees' warm-up and recording
                run()
            synchronize(ids.device)
        except Exception as err:  # noqa: BLE001 - a compile failure is the reason the peer is missing
            raise PeerUnavailable(f"torch.compile failed: {type(err).__name__}: {str(err)[:300]}") from err
        return run

    def _compile(self):
        if self._compile_error is not None:
            raise PeerUnavailable(self._compile_error)
        if self._compiled is None:
            import torch._dynamo

            config = torch._dynamo.config
            if hasattr(config, "recompile_limit"):  # cache_size_limit before torch 2.6; an alias since
                config.recompile_limit = max(config.recompile_limit, _RECOMPILES)
            else:
                config.cache_size_limit = max(config.cache_size_limit, _RECOMPILES)
            try:
                with torch.inference_mode(False), torch.no_grad():
                    twin = copy.deepcopy(self.model)
                self._compiled = torch.compile(twin, mode="reduce-overhead", dynamic=False)
            except Exception as err:  # noqa: BLE001
                self._compile_error = f"torch.compile failed: {type(err).__name__}: {str(err)[:300]}"
                raise PeerUnavailable(self._compile_error) from err
        return self._compiled
