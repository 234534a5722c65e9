"""Texts and labels from a data file, as ``eek fit`` and ``eek evaluate`` read them.

    data = read_labelled("train.csv", text_column="text", label_column="label")

What the training does with them (class ids, tokenized rows, batches) is
:mod:`earlyexit_kernels.training.labelled_texts`. Every problem a user can fix is a
:class:`~earlyexit_kernels.training.labelled_texts.DataError` whose message says what to change.
"""

from __future__ import annotations

import math

from earlyexit_kernels.training.labelled_texts import DataError, LabelledTexts

__all__ = ["read_labelled"]


def read_labelled(
    path: str,
    *,
    text_column: str = "text",
    pair_column: str | None = None,
    label_column: str | None = "label",
    label_required: bool = False,
) -> LabelledTexts:
    """Every row of ``path`` (.csv, .tsv, .jsonl, .parquet): its text, pair and label.

    Without the column ``label_column`` the labels are None, unless ``label_required``
    (then :class:`DataError`). Null or empty texts are read as the empty text; a file with
    no rows, a missing text column or a non-text value is a :class:`DataError`.
    """
    from earlyexit_kernels.integrations.table_io import TableError, read_chunks

    wanted = [name for name in (text_column, pair_column) if name]
    try:
        chunks = list(read_chunks(path, 65536, text_columns=wanted))
    except TableError as error:
        raise DataError(str(error)) from None
    names = chunks[0].column_names
    for name, option in ((text_column, "--text-column"), (pair_column, "--pair-column")):
        if name is not None and name not in names:
            raise DataError(f"{path} has no column {name!r} ({option}); its columns are {names}")
    has_labels = label_column is not None and label_column in names
    if label_required and not has_labels:
        raise DataError(f"{path} has no column {label_column!r} (--label-column); its columns are {names}")
    texts, pairs, labels = [], [] if pair_column else None, [] if has_labels else None
    for chunk in chunks:
        first = len(texts)
        texts += [_text(v, text_column, first + i, path) for i, v in enumerate(chunk.column(text_column).to_pylist())]
        if pair_column:
            values = chunk.column(pair_column).to_pylist()
            pairs += [_text(v, pair_column, first + i, path) for i, v in enumerate(values)]
        if has_labels:
            labels += chunk.column(label_column).to_pylist()
    if not texts:
        raise DataError(f"{path} has no rows")
    return LabelledTexts(texts, pairs, labels, path, label_column if has_labels else None)


def _text(value, column: str, row: int, path: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}, row {row}: column {column!r} holds {type(value).__name__} {value!r}, not text")
    return value
