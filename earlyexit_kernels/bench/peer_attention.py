"""What attention the captured peers run, and why a fast SDPA kernel refuses a call.

The captured peer without a mask fell to PyTorch's math attention in float32 on an H100 (10.35 ms
for BERT-base bf16, B = 64, S = 128, against 4.07 ms captured with an all-ones mask; the profiler
showed two ``sm80_xmma_gemm_f32f32`` kernels a layer). transformers 5.17's ``sdpa_mask`` cannot read
the mask back while a CUDA graph is being captured (``is_tracing`` is true then), so with no mask
given it still builds one: ``q_idx >= 0`` broadcast and expanded to ``[B, 1, S, S]``, strides
``(0, 0, 1, 0)``, all true. transformers 5.24 skips it when no mask is given. This module:

- :func:`recorded_attention` wraps ``torch.nn.functional.scaled_dot_product_attention`` (the call
  transformers' SDPA attention makes, looked up at each call) for the duration of a context and
  records each distinct call it sees: the query's shape and dtype, the mask's shape, strides and
  dtype (or none), and each fast backend's verdict on the call as it was made; with
  ``drop_key_constant_masks`` it also drops a boolean mask constant along the keys (size 1 or
  stride 0 on the last axis: every query row keeps all keys or none, so it masks nothing a softmax
  over a row with any key can see), and counts the calls where it did;
- :func:`sdpa_verdicts` asks torch why each of flash, memory-efficient and cuDNN attention would
  refuse a call (``torch.backends.cuda.can_use_*_attention(SDPAParams(...), debug=True)``: the
  reasons are warnings, from C++ on standard error or Python's ``warnings``; both are kept). Those
  checks judge CUDA tensors only: on another device every verdict says it was not checked;
- :func:`forced_attention`: ``torch.nn.attention.sdpa_kernel`` with the fast backends only, so that
  a call no fast kernel takes raises (with torch's reasons, :func:`kept_warnings`) instead of
  falling back to the math kernel. On the CPU, flash attention has a kernel of its own (it runs
  there); the memory-efficient and cuDNN ones do not, and forcing only those is refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "FAST_BACKENDS",
    "AttentionLog",
    "forced_attention",
    "kept_warnings",
    "recorded_attention",
    "refused",
    "sdpa_verdicts",
]

#: the SDPA backends the fast peer is held to (the names its records use)
FAST_BACKENDS = ("flash", "efficient", "cudnn")
_ENUM = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
_CHECKS = {
    "flash": "can_use_flash_attention",
    "efficient": "can_use_efficient_attention",
    "cudnn": "can_use_cudnn_attention",
}


@contextlib.contextmanager
def kept_warnings() -> Iterator[list[str]]:
    """Inside: Python's warnings and what C++ writes on file descriptor 2 are kept, in the list yielded
    (filled when the context ends), not shown. torch's debug checks warn from C++ (``TORCH_WARN``): from a
    plain binding to standard error, from an operator called by Python as a Python warning."""
    kept: list[str] = []
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        sink = stack.enter_context(tempfile.TemporaryFile())
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2: Python's warnings only
            saved = None
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            yield kept
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                kept += [line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip()]
            kept += [str(w.message).strip() for w in caught]


def _reasons(lines: list[str]) -> str:
    """torch's warning lines in short: ``[W... sdp_utils.cpp:123] Warning: X (function f)`` -> ``X``."""
    out = []
    for line in lines:
        text = line.split("] Warning: ", 1)[-1] if "] Warning: " in line else line
        text = text.split(" (function ", 1)[0].strip()
        if text and text not in out:
            out.append(text)
    return "; ".join(out)


def _params(query, key, value, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool):
    params = torch.backends.cuda.SDPAParams
    try:
        return params(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    except TypeError:  # torch before 2.5: no enable_gqa
        return params(query, key, value, attn_mask, dropout_p, is_causal)


def sdpa_verdicts(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> dict[str, str]:
    """Per backend of :data:`FAST_BACKENDS`: ``ok`` where torch would run it on this call, else why not."""
    if query.device.type != "cuda":
        why = f"not checked: torch's checks judge CUDA tensors, these are on {query.device.type}"
        return dict.fromkeys(FAST_BACKENDS, why)
    try:
        params = _params(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    except (AttributeError, TypeError, RuntimeError) as err:
        return dict.fromkeys(FAST_BACKENDS, f"not checked: SDPAParams failed: {type(err).__name__}: {err}")
    verdicts = {}
    for name in FAST_BACKENDS:
        check = getattr(torch.backends.cuda, _CHECKS[name], None)
        if check is None:
            verdicts[name] = f"not checked: this torch has no torch.backends.cuda.{_CHECKS[name]}"
            continue
        try:
            with kept_warnings() as lines:
                ok = check(params, True)
        except Exception as err:  # noqa: BLE001 - a check that fails must not stop the call it describes
            verdicts[name] = f"not checked: {type(err).__name__}: {str(err)[:200]}"
            continue
        verdicts[name] = "ok" if ok else f"refused: {_reasons(lines) or 'torch gave no reason'}"
    return verdicts


def _describe(tensor: torch.Tensor | None) -> dict | None:
    if tensor is None:
        return None
    return {"shape": list(tensor.shape), "strides": list(tensor.stride()), "dtype": str(tensor.dtype).split(".")[-1]}


def _key_constant(mask: torch.Tensor | None) -> bool:
    """A boolean mask the same for every key of a query row (by its layout: nothing is read)."""
    return mask is not None and mask.dtype == torch.bool and (mask.size(-1) == 1 or mask.stride(-1) == 0)


@dataclass
class AttentionLog:
    """The distinct SDPA calls seen in a :func:`recorded_attention` context, in order, each with ``count``."""

    calls: list[dict] = field(default_factory=list)
    dropped: int = 0  # calls whose key-constant mask was dropped

    def summary(self) -> str:
        """One line: each distinct call's mask (``none``, or shape, strides and dtype), its count and verdicts."""
        if not self.calls:
            return "no SDPA call seen"
        parts = []
        for call in self.calls:
            mask = call["mask"]
            where = (
                "no mask"
                if mask is None
                else f"mask {tuple(mask['shape'])} strides {tuple(mask['strides'])} {mask['dtype']}"
            )
            if call["dropped"]:
                where += " (dropped: constant along the keys)"
            verdicts = _verdict_text(call["verdicts"])
            parts.append(
                f"{call['count']} call(s), query {tuple(call['query']['shape'])} {call['query']['dtype']}, {where}; {verdicts}"
            )
        return " | ".join(parts)


def _verdict_text(verdicts: dict[str, str]) -> str:
    """``flash ok, efficient refused: ...``; one verdict shared by every backend said once."""
    if len(set(verdicts.values())) == 1:
        return f"{', '.join(verdicts)}: {next(iter(verdicts.values()))}"
    return ", ".join(f"{k} {v}" for k, v in verdicts.items())


@contextlib.contextmanager
def recorded_attention(drop_key_constant_masks: bool = False) -> Iterator[AttentionLog]:
    """Inside: every ``torch.nn.functional.scaled_dot_product_attention`` call is recorded in the yielded
    :class:`AttentionLog` (once per distinct layout, with a count); with ``drop_key_constant_masks``, a
    boolean mask constant along the keys is passed on as no mask."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    log = AttentionLog()
    seen: dict[tuple, dict] = {}

    def wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        drop = drop_key_constant_masks and _key_constant(attn_mask)
        signature = (
            tuple(query.shape),
            query.dtype,
            None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype),
            bool(is_causal),
            drop,
        )
        if signature in seen:
            seen[signature]["count"] += 1
        else:
            gqa = bool(kwargs.get("enable_gqa", False))
            call = {
                "query": _describe(query),
                "mask": _describe(attn_mask),
                "is_causal": bool(is_causal),
                "dropped": drop,
                "verdicts": sdpa_verdicts(
                    query, key, value, attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa
                ),
                "count": 1,
            }
            seen[signature] = call
            log.calls.append(call)
        if drop:
            log.dropped += 1
            attn_mask = None
        return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)

    F.scaled_dot_product_attention = wrapper
    try:
        yield log
    finally:
        F.scaled_dot_product_attention = original


def forced_attention(backends: tuple[str, ...] = FAST_BACKENDS):
    """``sdpa_kernel`` with ``backends`` only (names of :data:`FAST_BACKENDS`): a call none of them takes raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unknown = [b for b in backends if b not in _ENUM]
    if unknown or not backends:
        raise ValueError(f"backends must be some of {', '.join(FAST_BACKENDS)}; got {', '.join(backends) or 'none'}")
    return sdpa_kernel([getattr(SDPBackend, _ENUM[b]) for b in backends])


def refused(err: BaseException, lines: list[str], log: AttentionLog | None) -> str:
    """Why a forced call failed, in one line: torch's error, its warnings and the calls seen."""
    text = f"{type(err).__name__}: {str(err).strip()[:300]}"
    if reasons := _reasons(lines):
        text += f"; torch said: {reasons[:600]}"
    if log is not None:
        text += f"; SDPA calls: {log.summary()[:600]}"
    return text
