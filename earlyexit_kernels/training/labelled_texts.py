"""Labelled (or unlabelled) texts as the training takes them: class ids, tokenized rows, batches.

    labels = label_ids(data, model.config)                       # LongTensor [N] of class ids
    encoded = encode(tokenizer, data, max_length=128)
    batches = length_sorted_batches(encoded, labels, batch_size=32)   # for evaluation and recording
    batches = shuffled_batches(encoded, labels, batch_size=32, seed=0)  # for training

Labels are the model's label names (``config.id2label``, e.g. ``fresh``) or class ids
``0..C-1``; anything else is a :class:`DataError` naming the values it found. Reading the
rows from a data file is :func:`earlyexit_kernels.integrations.table_io.read_labelled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DataError",
    "LabelledTexts",
    "Encoded",
    "label_ids",
    "split_rows",
    "encode",
    "length_sorted_batches",
    "length_order",
    "order_by_length",
    "shuffled_batches",
]


class DataError(ValueError):
    """A data file or column that cannot be used as asked; the message says what to change."""


@dataclass
class LabelledTexts:
    """The rows of a data file: ``texts`` (and ``pairs``, the second texts, or None) and the raw
    ``labels`` of the label column (None when the file has none); ``path`` for messages."""

    texts: list[str]
    pairs: list[str] | None
    labels: list | None
    path: str
    label_column: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: list[int]) -> LabelledTexts:
        """The rows ``rows`` (indices), in that order."""
        pick = [self.texts[i] for i in rows]
        pairs = None if self.pairs is None else [self.pairs[i] for i in rows]
        labels = None if self.labels is None else [self.labels[i] for i in rows]
        return LabelledTexts(pick, pairs, labels, self.path, self.label_column)


def _empty(label) -> bool:
    return (
        label is None or (isinstance(label, float) and label != label) or (isinstance(label, str) and not label.strip())
    )


def split_unlabelled(data: LabelledTexts) -> tuple[LabelledTexts, LabelledTexts | None]:
    """``data``'s rows with a label, and those whose label cell is empty (None where there is none). A file
    whose every label cell is empty has no labels: all its rows come back as the first, with labels None."""
    if data.labels is None:
        return data, None
    empty = [i for i, label in enumerate(data.labels) if _empty(label)]
    if not empty:
        return data, None
    if len(empty) == len(data):
        return LabelledTexts(data.texts, data.pairs, None, data.path, None), None
    chosen = set(empty)
    labelled = data.subset([i for i in range(len(data)) if i not in chosen])
    unlabelled = data.subset(empty)
    unlabelled.labels, unlabelled.label_column = None, None
    return labelled, unlabelled


def joined_texts(first: LabelledTexts | None, second: LabelledTexts | None) -> LabelledTexts | None:
    """The rows of ``first`` then ``second``, without labels (either may be None)."""
    if first is None or second is None:
        return first if second is None else second
    if (first.pairs is None) != (second.pairs is None):
        raise DataError(f"{first.path} and {second.path} must both have the pair column, or neither")
    pairs = None if first.pairs is None else first.pairs + second.pairs
    return LabelledTexts(first.texts + second.texts, pairs, None, f"{first.path} and {second.path}", None)


def label_ids(data: LabelledTexts, config) -> torch.Tensor:
    """The class id of every row's label: LongTensor [N].

    A label is one of the model's label names (``config.id2label``) or a class id
    ``0..num_labels-1`` (an integer, or its digits in a CSV file). :class:`DataError` when
    the file has no labels, a label is missing, or the values are neither.
    """
    if data.labels is None:
        raise DataError(f"{data.path} has no label column")
    num_labels = config.num_labels
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    by_name = {name: i for i, name in id2label.items()}
    missing = [row for row, value in enumerate(data.labels) if value is None or value == ""]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DataError(
            f"{data.path}: {len(missing)} rows have no label in column {data.label_column!r} (rows {shown}; "
            f"row 0 is the first data row); label every row or drop the unlabelled ones"
        )
    values = [v.strip() if isinstance(v, str) else v for v in data.labels]
    if all(isinstance(v, str) and v in by_name for v in values):
        return torch.tensor([by_name[v] for v in values], dtype=torch.long)
    ids = [_as_class_id(v) for v in values]
    if all(i is not None and 0 <= i < num_labels for i in ids):
        return torch.tensor(ids, dtype=torch.long)
    found = sorted({str(v) for v in values})
    shown = ", ".join(repr(v) for v in found[:8]) + (", ..." if len(found) > 8 else "")
    names = ", ".join(repr(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels))
    raise DataError(
        f"{data.path}: column {data.label_column!r} holds the labels {shown}, which are neither the model's "
        f"label names ({names}, its config's id2label) nor class ids 0..{num_labels - 1}; map them to one of "
        f"these, or give the model the right id2label"
    )


def _as_class_id(value) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def split_rows(
    count: int, fraction: float, seed: int = 0, *, option: str = "--validation-split", held_as: str = "validation"
) -> tuple[list[int], list[int]]:
    """(rest, held out): a random ``fraction`` of ``range(count)`` held out, drawn from ``seed``.

    ``option`` and ``held_as`` name the option and the held rows in the error messages."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{option} must lie strictly between 0 and 1, got {fraction}")
    held = round(count * fraction)
    if held < 1 or held >= count:
        hint = "give more rows or a validation file (--validation)" if held_as == "validation" else "give more rows"
        raise DataError(
            f"{option} {fraction} of {count} rows leaves {held} {held_as} and {count - held} training rows; {hint}"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


@dataclass
class Encoded:
    """Token ids of N texts, unpadded: ``input_ids`` and ``token_type_ids`` (lists of lists), and
    how many texts were truncated to ``max_length``."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    truncated: int
    max_length: int
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, data: LabelledTexts, max_length: int) -> Encoded:
    """Tokenize every row of ``data`` (special tokens included), truncated to ``max_length`` tokens."""
    args = (data.texts,) if data.pairs is None else (data.texts, data.pairs)
    full = tokenizer(*args, truncation=False, add_special_tokens=True, verbose=False)
    truncated = sum(len(ids) > max_length for ids in full["input_ids"])
    if truncated:
        full = tokenizer(*args, truncation=True, max_length=max_length, add_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(full["input_ids"], full.get("token_type_ids"), truncated, max_length, pad)


def _batch(encoded: Encoded, rows: list[int], labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``rows``: input_ids, attention_mask, token_type_ids (where the tokenizer
    gives them: a family without token types refuses even zeros), rows [n], labels."""
    width = max(len(encoded.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), encoded.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    types = None if encoded.token_type_ids is None else torch.zeros(len(rows), width, dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(encoded.input_ids[i])
        ids[r, :n] = torch.tensor(encoded.input_ids[i])
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = torch.tensor(encoded.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows)}
    if types is not None:
        batch["token_type_ids"] = types
    if labels is not None:
        batch["labels"] = labels[rows]
    return batch


def length_sorted_batches(
    encoded: Encoded, labels: torch.Tensor | None = None, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows sorted by token count (longest first), each padded to its longest.

    Each batch has ``input_ids``, ``attention_mask``, ``token_type_ids`` (where the tokenizer gives
    them) [n, S], ``rows`` [n] (the
    rows' positions in the data) and, with ``labels`` [N], ``labels`` [n].
    """
    order = length_order(encoded)
    return [_batch(encoded, order[s : s + batch_size], labels) for s in range(0, len(order), batch_size)]


def length_order(encoded: Encoded) -> list[int]:
    """The order :func:`length_sorted_batches` puts rows in: by token count, longest first, ties in input order.
    A record of calibration rows comes in this order, so any test on it that reads rows in order must draw its own."""
    return order_by_length([len(ids) for ids in encoded.input_ids])


def order_by_length(lengths) -> list[int]:
    """:func:`length_order` of rows of these token counts (a sequence of ints, or a tensor [N]): what a re-draw of
    records without texts uses to put its rows in production's order."""
    counts = [int(n) for n in lengths]
    return sorted(range(len(counts)), key=lambda i: (-counts[i], i))


def shuffled_batches(
    encoded: Encoded, labels: torch.Tensor | None = None, batch_size: int = 32, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows in a random order drawn from ``seed`` (as for training)."""
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    return [_batch(encoded, order[s : s + batch_size], labels) for s in range(0, len(order), batch_size)]
