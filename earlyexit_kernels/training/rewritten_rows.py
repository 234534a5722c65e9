"""More rows for the exit heads, made from the training rows: each rewritten, and labelled by the full model.

An exit head has to reproduce the full model's answer from one early layer, and on a few thousand rows it is short of
examples: the calibration share's probe measured about 0.2 fewer certified layers for every doubling of the heads'
training rows from 1,024 to 4,096 (docs/training.md, "Every row used"). Rows made from the training rows are free,
and their label needs no person: the head's target is what the full model answers on them. So ``eek fit --rewrites
N`` writes N rewritten copies of every training row, as TinyBERT grows its distillation set, each one of:

- ``drop``: a random 10-25% of its words dropped (one at least);
- ``span``: a contiguous span of 50-90% of its words kept;
- ``join``: its first half of words joined to another training row's second half (answers the full model is less
  sure of, which the heads see too seldom).

Words are runs of non-space characters, joined again by one space; a row of fewer than 4 words is copied as it is.
The copies train the heads only: never a validation, calibration or unlabelled row is rewritten, and the copies are
labelled by the full model (the model the certificate measures against) on the copies themselves. With labelled
rows, the copies carry that class as their label; without labels the heads distil the full model on them, as on
every other row.
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

__all__ = ["REWRITES", "full_model_classes", "rewrite", "rewritten_texts", "with_rows"]

#: the three ways a row is rewritten, drawn alike for each copy
REWRITES = ("drop", "span", "join")
#: rows shorter than this (in words) are copied unchanged: dropping or cutting them leaves too little of the row
_FEWEST_WORDS = 4
_WORD = re.compile(r"\S+")


def rewrite(text: str, other: str, rng: random.Random) -> str:
    """One rewritten copy of ``text`` (:data:`REWRITES`, drawn with ``rng``); ``other``: the row a ``join`` takes
    its second half from."""
    words = _WORD.findall(text)
    if len(words) < _FEWEST_WORDS:
        return text
    kind = REWRITES[rng.randrange(len(REWRITES))]
    if kind == "drop":
        dropped = set(rng.sample(range(len(words)), max(1, round(len(words) * rng.uniform(0.1, 0.25)))))
        return " ".join(word for i, word in enumerate(words) if i not in dropped)
    if kind == "span":
        length = max(2, round(len(words) * rng.uniform(0.5, 0.9)))
        start = rng.randrange(len(words) - length + 1)
        return " ".join(words[start : start + length])
    others = _WORD.findall(other)
    return " ".join(words[: len(words) // 2] + others[len(others) // 2 :])


def rewritten_texts(texts: list[str], copies: int, seed: int) -> list[str]:
    """``copies`` rewritten copies of every text of ``texts``: the first copy of each row in order, then the second,
    ...; drawn from ``seed`` alone, so the same rows and seed give the same copies."""
    if not texts or copies <= 0:
        return []
    rng = random.Random(seed)
    return [rewrite(text, texts[rng.randrange(len(texts))], rng) for _ in range(copies) for text in texts]


@torch.no_grad()
def full_model_classes(model, encoded) -> torch.Tensor:
    """The full model's class on every row of ``encoded`` (:class:`~earlyexit_kernels.training.labelled_texts.Encoded`),
    LongTensor [N] in the rows' order: the last layer of the patched ``model``'s all-exits record, as the certificate
    reads the full model."""
    from earlyexit_kernels.training.calibrate_model import record_exits
    from earlyexit_kernels.training.labelled_texts import length_sorted_batches

    batches = length_sorted_batches(encoded, None, 64)
    classes = record_exits(model, batches).all_logits[-1].argmax(-1)
    order = torch.cat([batch["rows"] for batch in batches])
    out = torch.empty(len(encoded.input_ids), dtype=torch.long)
    out[order] = classes
    return out


def with_rows(encoded, more):
    """``encoded``'s rows, then ``more``'s (two :class:`~earlyexit_kernels.training.labelled_texts.Encoded` of one
    tokenizer and length)."""
    types = None
    if encoded.token_type_ids is not None:
        types = list(encoded.token_type_ids) + list(more.token_type_ids)
    return dataclasses.replace(encoded, input_ids=list(encoded.input_ids) + list(more.input_ids), token_type_ids=types)
