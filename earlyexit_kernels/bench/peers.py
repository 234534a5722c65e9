"""The strongest unpatched peers on a GPU: the same model captured in a CUDA graph, and ``torch.compile``'d.

Early exit is compared with the unpatched model as Hugging Face runs it (``eager``), and on CUDA
also with what a user who cares about the launch floor would run instead of early exit:

- ``cuda-graphs``: the unpatched model's forward captured once in a ``torch.cuda.CUDAGraph`` on
  fixed input buffers (warmed up on the stream that captures first), then replayed; each call
  copies its inputs into the buffers, as a server must. It gets the attention mask as a user's
  tokenizer gives it, all ones included;
- ``cuda-graphs-fast-attn``: the same, captured without a mask where nothing is padded and with
  SDPA held to its fast kernels (``torch.nn.attention.sdpa_kernel`` with flash, memory-efficient
  and cuDNN attention: a call none of them takes fails the capture, with torch's reasons, instead
  of falling back to the math kernel). A boolean mask constant along the keys that transformers
  builds anyway while capturing (5.17 does with no mask given: all true, strides ``(0, 0, 1, 0)``)
  masks nothing and is dropped at the SDPA call (:mod:`.peer_attention`); the row's ``check``
  compares its logits with the eager model's all the same;
- ``compile-reduce-overhead``: ``torch.compile(model, mode="reduce-overhead")`` (Inductor's kernels
  in CUDA graphs, ``dynamic=False``: one graph per shape, the fastest a shape gets), compiled once
  per model and shape and warmed up before it is timed. It runs on a copy of the model made
  before any patching, so that patching and unpatching the measured model never trips a guard
  and recompiles it.

On an H100 (bf16, BERT-base, B = 64, S = 128) the forward captured without a mask ran at 10.35 ms
(math attention in float32), with an all-ones mask at 4.07 ms, the eager model at 5.17 ms
(``gpu_session_report.py peer-capture``, benchmarks/results/nvidia_h100_80gb_hbm3/gpu_session_2026-11-27b/);
``cuda-graphs-fast-attn`` is not timed on a GPU yet. The compiled peer gets the mask
only where it masks something (Hugging Face drops an all-ones mask after reading it back, which a
compiled forward cannot do; not measured the other way on a GPU). The suite times whichever of them is faster as the peer its ratios are
taken against (``strongest_peer``, :mod:`.results`). None exists without CUDA:
:func:`unavailable` says why, and the suite writes that in the row. Without CUDA the two captured
peers are rehearsed first, uncaptured (their attention settings, the SDPA calls recorded), and the
row says how that went; ``PeerModels(model, capture=False)`` runs them uncaptured (tests).
What each captured peer's SDPA calls were while it was captured (the mask's shape, strides and
dtype, each fast kernel's verdict) is kept in ``PeerModels.notes``, which the sweep writes to
``meta.json``.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from earlyexit_kernels.bench.peer_attention import (
    FAST_BACKENDS,
    forced_attention,
    kept_warnings,
    recorded_attention,
    refused,
)
from earlyexit_kernels.bench.timing import synchronize
from earlyexit_kernels.engine.graphed.step_graphs import capture_stream

__all__ = ["PEERS", "GRAPHED_PEERS", "PeerUnavailable", "unavailable", "PeerModels", "check_peer_names"]

PEERS = ("cuda-graphs", "cuda-graphs-fast-attn", "compile-reduce-overhead")
#: the peers captured in a CUDA graph: with the mask as given, and without one on the fast kernels
GRAPHED_PEERS = ("cuda-graphs", "cuda-graphs-fast-attn")
_ALIASES = {"compile": "compile-reduce-overhead", "graphs": "cuda-graphs", "fast-attn": "cuda-graphs-fast-attn"}
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
        how = "its forward captured in a CUDA graph" if peer in GRAPHED_PEERS else "Inductor's kernels in CUDA graphs"
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
    inputs in and replays it.

    ``fast``: no mask where nothing is padded, SDPA held to ``backends`` (:mod:`.peer_attention`) in
    the warm-up and the capture, a key-constant mask dropped. ``capture=False``: the same forward
    run uncaptured at every call, under the same attention settings (the CPU's rehearsal).
    ``note``: what the peer saw (filled in, also where it fails), for ``PeerModels.notes``.
    """

    def __init__(self, model, ids, mask, *, fast=False, capture=True, backends=FAST_BACKENDS, note=None):
        self.model, self.ids, self.mask = model, ids, mask
        self.fast, self.capture, self.backends = fast, capture, tuple(backends)
        inputs = _inputs(ids, mask, always_mask=not fast)
        self.static = {k: None if v is None else v.clone() for k, v in inputs.items()}
        self.note = {} if note is None else note
        self.note |= {
            "peer": "cuda-graphs-fast-attn" if fast else "cuda-graphs",
            "B": int(ids.shape[0]),
            "S": int(ids.shape[1]),
            "captured": capture,
            "mask_given": self.static["attention_mask"] is not None,
            "forced": list(self.backends) if fast else [],
        }
        if not capture:
            self.out, log = self._attended(lambda: model(**self.static), "the forward")
            self._noted(log)
            return
        # The warm-up on the stream that captures, as the graphed step's: cuBLAS keeps a workspace
        # per (handle, stream), and a stream first met inside the capture gets it from the graph's
        # pool. (Not why this peer ran at half the eager model's speed on an H100: the warm-up on
        # a side stream timed the same, docs/development.md "What the second GPU session found".)
        stream = capture_stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream(ids.device))

        def warm_up():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(**self.static)

        self._attended(warm_up, "the warm-up")
        torch.cuda.current_stream(ids.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()

        def capture_it():
            with torch.cuda.graph(self.graph, stream=stream):
                return model(**self.static)

        self.out, log = self._attended(capture_it, "the forward could not be captured", synchronize_on_error=True)
        self._noted(log)

    def _context(self, stack: contextlib.ExitStack):
        log = stack.enter_context(recorded_attention(drop_key_constant_masks=self.fast))
        if self.fast:
            stack.enter_context(forced_attention(self.backends))
        return log

    def _attended(self, fn, what: str, synchronize_on_error: bool = False):
        """``(fn(), the SDPA calls it made)`` under the peer's attention settings; :class:`PeerUnavailable`
        saying why (torch's reasons included) where it fails. Other warnings are passed on."""
        error = log = out = None
        with kept_warnings() as lines:
            try:
                with contextlib.ExitStack() as stack:
                    log = self._context(stack)
                    out = fn()
            except Exception as err:  # noqa: BLE001 - whatever stops it is the reason the peer is missing
                error = err
        if error is not None:
            if synchronize_on_error:
                torch.cuda.synchronize(self.ids.device)
            forced = f" (SDPA held to {', '.join(self.backends)})" if self.fast else ""
            why = f"{what}{forced}: {refused(error, lines, log)}"
            self.note["refused"] = why
            self._noted(log)
            raise PeerUnavailable(why) from error
        if lines:
            print("\n".join(lines), file=sys.stderr)
        return out, log

    def _noted(self, log) -> None:
        if log is not None:
            self.note.update(sdpa_calls=log.calls, masks_dropped=log.dropped, summary=log.summary())

    def __call__(self):
        self.static["input_ids"].copy_(self.ids)
        if self.static["attention_mask"] is not None:
            self.static["attention_mask"].copy_(self.mask)
        if not self.capture:
            with contextlib.ExitStack() as stack:
                self._context(stack)
                return self.model(**self.static)
        self.graph.replay()
        return self.out


class PeerModels:
    """The peers of one model, made on first use: what the suite's runner calls per configuration.

    ``model`` must be unpatched when this is made (the compiled peer copies it then) and when a
    captured peer is captured. ``capture``: None captures on CUDA and, elsewhere, rehearses the
    captured peers uncaptured before saying they are unavailable; False runs them uncaptured
    (their rows time the eager forward under their attention settings: tests). ``fast_backends``: the
    SDPA backends ``cuda-graphs-fast-attn`` is held to. ``notes``: one per captured peer made (or
    refused), what its SDPA calls were (see :class:`_Graphed`).
    """

    def __init__(self, model, capture: bool | None = None, fast_backends: tuple[str, ...] = FAST_BACKENDS):
        self.model = model
        self.capture = capture
        self.fast_backends = tuple(fast_backends)
        self.notes: list[dict] = []
        self._compiled = None
        self._compile_error: str | None = None

    def runner(self, peer: str, ids: torch.Tensor, mask: torch.Tensor):
        """A no-argument callable running ``peer`` on ``ids``/``mask``, warmed up; raises :class:`PeerUnavailable`."""
        if peer in GRAPHED_PEERS:
            return self._graphed(peer, ids, mask)
        reason = unavailable(peer, ids.device)
        if reason is not None:
            raise PeerUnavailable(reason)
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

    def _graphed(self, peer: str, ids: torch.Tensor, mask: torch.Tensor):
        reason = unavailable(peer, ids.device)
        capture = reason is None if self.capture is None else self.capture
        if capture and reason is not None:
            raise PeerUnavailable(reason)
        note: dict = {}
        self.notes.append(note)
        try:
            fast = peer == "cuda-graphs-fast-attn"
            made = _Graphed(self.model, ids, mask, fast=fast, capture=capture, backends=self.fast_backends, note=note)
        except PeerUnavailable as err:
            if reason is None or self.capture is not None:
                raise
            raise PeerUnavailable(f"{reason}; rehearsed uncaptured: {err}") from err
        if reason is not None and self.capture is None:  # the rehearsal: said, not timed
            raise PeerUnavailable(f"{reason}; rehearsed uncaptured: ran, {note['summary']}"[:900])
        return made

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
