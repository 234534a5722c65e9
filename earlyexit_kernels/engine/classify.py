"""``eek.classify``: early-exit predictions for a stream of texts, text pairs or token ids.

    for p in eek.classify(model, texts, tokenizer=tok):
        p.index, p.logits, p.exit_layer, p.layers_run

The stream runs on :class:`earlyexit_kernels.engine.continuous.ContinuousEngine`: every layer
call is full and of a fixed shape, and a sequence leaves as soon as its policy says so.
Inputs are consumed lazily, a bounded number ahead of the engine.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from earlyexit_kernels.engine.continuous import ContinuousEngine

__all__ = ["Prediction", "classify"]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One input's prediction: equal to ``model(...)`` on that input alone.

    ``index``: position of the input. ``logits``: FloatTensor [C] on the CPU, model dtype.
    ``exit_layer``: 1..L. ``layers_run``: layers computed (differs only with SkipGates).
    """

    index: int
    logits: torch.Tensor
    exit_layer: int
    layers_run: int


def classify(
    model,
    inputs: Iterable,
    *,
    tokenizer=None,
    max_batch_size: int = 64,
    max_tokens: int | None = None,
    max_length: int | None = None,
    ordered: bool = True,
    progress: bool = False,
    compile: bool | dict = False,
    max_in_flight: int | None = None,
    length_step: int | None = None,
    read_ahead: int | None = None,
    admission: str = "length",
    packed: bool | None = None,
) -> Iterator[Prediction]:
    """Classify every item of ``inputs`` with the patched ``model``; a generator of :class:`Prediction`.

    ``inputs``: an iterable of ``str``, ``(str, str)`` pairs, or dicts with ``input_ids``
    (list or 1-D tensor, special tokens included) and optionally ``token_type_ids`` and a
    right-padding ``attention_mask``; read lazily. Texts need ``tokenizer``.
    ``max_batch_size``: most rows per layer call. ``max_tokens``: most rows x padded
    length per layer call. ``max_length``: longer sequences are truncated (one warning
    says so); default what the model's positions hold. ``ordered``: yield in input order
    (True) or as sequences exit (False). ``progress``: a tqdm bar. ``compile``: layer
    calls through ``torch.compile`` (True, or a dict of its options, e.g.
    ``{"mode": "reduce-overhead"}`` on a GPU). ``max_in_flight``, ``length_step``,
    ``admission`` (here ``"length"`` by default), ``packed``: see
    :class:`earlyexit_kernels.engine.continuous.ContinuousEngine`. ``read_ahead``: how many
    tokenized inputs wait for admission (default ``32 * max_in_flight``); the length sweep
    picks from them.

    Memory: at most ``read_ahead + max_in_flight`` inputs (and one tokenizing chunk of
    ``max_batch_size``) are read and not yet yielded at any time; only ``max_in_flight``
    of them hold hidden states.
    """
    engine = ContinuousEngine(
        model,
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        length_step=length_step,
        max_in_flight=max_in_flight,
        compile=compile,
        admission=admission,
        packed=packed,
    )
    if read_ahead is None:
        # Wide: the length sweep's batches pad less and exit together more the more it sees.
        read_ahead = 32 * engine.scheduler.max_in_flight
    if not isinstance(read_ahead, int) or isinstance(read_ahead, bool) or read_ahead < 1:
        raise ValueError(f"read_ahead must be an integer >= 1, got {read_ahead!r}")
    return _predictions(engine, inputs, tokenizer, ordered, progress, read_ahead)


def _predictions(engine: ContinuousEngine, inputs, tokenizer, ordered: bool, progress: bool, read_ahead: int):
    total = len(inputs) if hasattr(inputs, "__len__") else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="seq", desc="eek.classify")
    encoded = _encode(iter(inputs), tokenizer, engine.max_length, chunk=engine.buckets.max_batch_size)
    # Read ahead: up to read_ahead pending, and no more than read_ahead + max_in_flight inputs
    # read and not yet yielded (pending, in flight, or exited and waiting for their turn).
    limit = read_ahead + engine.scheduler.max_in_flight
    waiting: dict[int, Prediction] = {}
    next_index = 0
    exhausted = False
    try:
        while True:
            while (
                not exhausted
                and engine.pending < read_ahead
                and engine.pending + engine.in_flight + len(waiting) < limit
            ):
                item = next(encoded, None)
                if item is None:
                    exhausted = True
                else:
                    engine.submit(*item)
            if engine.idle:
                break
            for done in engine.step():
                prediction = Prediction(done.key, done.logits, done.exit_layer, done.layers_run)
                if bar is not None:
                    bar.update(1)
                if not ordered:
                    yield prediction
                    continue
                waiting[prediction.index] = prediction
                while next_index in waiting:
                    yield waiting.pop(next_index)
                    next_index += 1
    finally:
        if bar is not None:
            bar.close()


def _encode(items: Iterator, tokenizer, max_length: int, chunk: int):
    """``(index, input_ids, token_type_ids)`` per input, tokenizing texts ``chunk`` inputs at a time."""
    truncated = _TruncationNotice(max_length)
    start = 0
    while True:
        batch = list(itertools.islice(items, chunk))
        if not batch:
            return
        encoded: list = [None] * len(batch)
        texts, pairs = [], []
        for i, item in enumerate(batch):
            if isinstance(item, str):
                texts.append(i)
            elif isinstance(item, (tuple, list)):
                if len(item) != 2 or not all(isinstance(text, str) for text in item):
                    raise TypeError(f"input {start + i}: a text pair must be two strings, got {item!r}")
                if item[1]:
                    pairs.append(i)
                else:  # as tokenizer(text, ""), which ignores an empty second text
                    batch[i] = item[0]
                    texts.append(i)
            elif isinstance(item, dict):
                encoded[i] = _token_ids(item, start + i, max_length, truncated)
            else:
                raise TypeError(
                    f"input {start + i}: expected a str, a (str, str) pair or a dict with input_ids, "
                    f"got {type(item).__name__}"
                )
        for group in (texts, pairs):
            if not group:
                continue
            if tokenizer is None:
                raise ValueError(
                    "classify got texts but no tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)"
                )
            # One token more than allowed tells which inputs truncation cuts; only those are tokenized again.
            out = _tokenize(tokenizer, [batch[i] for i in group], max_length + 1)
            for k, i in enumerate(group):
                if len(out["input_ids"][k]) > max_length:
                    truncated.note(start + i)
                    encoded[i] = _first(_tokenize(tokenizer, [batch[i]], max_length), 0)
                else:
                    encoded[i] = _first(out, k)
        for i, (ids, types) in enumerate(encoded):
            yield start + i, ids, types
        start += len(batch)


def _tokenize(tokenizer, items: list, max_length: int):
    if isinstance(items[0], str):
        return tokenizer(items, truncation=True, max_length=max_length)
    return tokenizer([a for a, _ in items], [b for _, b in items], truncation=True, max_length=max_length)


def _first(encoding, k: int) -> tuple[list[int], list[int] | None]:
    types = encoding.get("token_type_ids")
    return encoding["input_ids"][k], (types[k] if types is not None else None)


def _token_ids(item: dict, index: int, max_length: int, truncated) -> tuple[list[int], list[int] | None]:
    if "input_ids" not in item:
        raise TypeError(f"input {index}: a dict input needs input_ids (and optionally token_type_ids, attention_mask)")
    ids = _as_list(item["input_ids"], index, "input_ids")
    types = (
        _as_list(item["token_type_ids"], index, "token_type_ids") if item.get("token_type_ids") is not None else None
    )
    if item.get("attention_mask") is not None:
        mask = [1 if m else 0 for m in _as_list(item["attention_mask"], index, "attention_mask")]
        length = sum(mask)
        if len(mask) != len(ids) or mask != [1] * length + [0] * (len(mask) - length):
            raise ValueError(
                f"input {index}: attention_mask must have one entry per token, ones then zeros (right padding)"
            )
        ids = ids[:length]
        types = types[:length] if types is not None else None
    if types is not None and len(types) != len(ids):
        raise ValueError(f"input {index}: token_type_ids has {len(types)} entries for {len(ids)} tokens")
    if not ids:
        raise ValueError(f"input {index}: no tokens; a sequence needs at least one ([CLS])")
    if len(ids) > max_length:
        truncated.note(index)
        ids = ids[:max_length]
        types = types[:max_length] if types is not None else None
    return ids, types


def _as_list(value, index: int, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"input {index}: {name} must be 1-D (one sequence), got shape {tuple(value.shape)}")
        return value.tolist()
    return list(value)


class _TruncationNotice:
    """Warns once, at the first input longer than ``max_length``."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.warned = False

    def note(self, index: int) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"input {index} (and maybe others) is longer than max_length={self.max_length} tokens and is "
                f"truncated; raise max_length (up to what the model's positions hold) to keep more",
                stacklevel=4,
            )
