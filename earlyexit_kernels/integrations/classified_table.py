"""The table ``eek classify`` reads and writes: its text columns, checked and read row by row, and the
columns the predictions add (label, score, exit_layer, layers_run; scores for a multi-label model;
audit_disagreement with ``--audit-fraction``)."""

from __future__ import annotations

import math
import sys

__all__ = ["AUDIT_COLUMN", "OUTPUT_COLUMNS", "ColumnError", "InputColumns", "with_predictions"]

OUTPUT_COLUMNS = ("label", "score", "exit_layer", "layers_run")
AUDIT_COLUMN = "audit_disagreement"  # with --audit-fraction, as Ray Data's class


class ColumnError(ValueError):
    """The input table cannot be read as asked; the message says what to change."""


def with_predictions(table, predictions, config, audited: bool = False):
    """``table`` with the columns label, score, exit_layer, layers_run of its ``predictions``
    (and, for a multi-label model, scores: every label's probability as a JSON object; with
    ``audited``, audit_disagreement: each audited row's disagreement with the full model)."""
    import json

    import pyarrow as pa
    import torch

    from earlyexit_kernels.integrations.labels import is_multi_label, label_probabilities, labels_and_scores

    if predictions:
        labels, scores = labels_and_scores(torch.stack([p.logits for p in predictions]), config)
    else:
        labels, scores = [], []
    values = {
        "label": pa.array(labels, pa.string()),
        "score": pa.array(scores, pa.float64()),
        "exit_layer": pa.array([p.exit_layer for p in predictions], pa.int64()),
        "layers_run": pa.array([p.layers_run for p in predictions], pa.int64()),
    }
    for name in OUTPUT_COLUMNS:
        table = table.append_column(name, values[name])
    if is_multi_label(config):  # every label with its probability, as a JSON object per row
        probabilities = label_probabilities(torch.stack([p.logits for p in predictions]), config) if predictions else []
        table = table.append_column("scores", pa.array([json.dumps(p) for p in probabilities], pa.string()))
    if audited:
        table = table.append_column(AUDIT_COLUMN, pa.array([p.disagreement for p in predictions], pa.float64()))
    return table


class InputColumns:
    """The text (and pair) columns of the input, checked, read row by row; empty texts counted."""

    def __init__(self, text: str, pair: str | None, *, audited: bool = False):
        self.text, self.pair = text, pair
        self.added = OUTPUT_COLUMNS + ((AUDIT_COLUMN,) if audited else ())
        self.empty_count, self.empty_rows = 0, []  # the first rows only: a file may have millions

    def check(self, table, path: str) -> None:
        if table.num_columns == 0 and table.num_rows == 0:  # an empty JSON lines file
            return
        names = table.column_names
        for name in (self.text, self.pair):
            if name is not None and name not in names:
                option = "--text-column" if name == self.text else "--pair-column"
                raise ColumnError(f"{path} has no column {name!r} ({option}); its columns are {names}")
        taken = [name for name in self.added if name in names]
        if taken:
            raise ColumnError(f"{path} already has the column(s) {taken} that the output adds; rename them")

    def items(self, table, first_row: int):
        if not table.num_rows:
            return
        texts = table.column(self.text).to_pylist()
        pairs = table.column(self.pair).to_pylist() if self.pair else None
        for offset, text in enumerate(texts):
            row = first_row + offset
            text = self._text(text, self.text, row)
            if pairs is None:
                empty = not text.strip()
                item = text
            else:
                pair = self._text(pairs[offset], self.pair, row)
                empty = not text.strip() or not pair.strip()
                item = (text, pair)
            if empty:
                self.empty_count += 1
                if len(self.empty_rows) < 20:
                    self.empty_rows.append(row)
            yield item

    @staticmethod
    def _text(value, column: str, row: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if not isinstance(value, str):
            raise ColumnError(f"row {row}: column {column!r} holds {type(value).__name__} {value!r}, not text")
        return value

    def warn_about_empty_texts(self) -> None:
        if not self.empty_count:
            return
        shown = ", ".join(map(str, self.empty_rows)) + (", ..." if self.empty_count > len(self.empty_rows) else "")
        where = f"{self.text!r}" + (f" or {self.pair!r}" if self.pair else "")
        print(
            f"warning: {self.empty_count} rows have an empty or null {where} and were classified as the empty "
            f"text, not dropped (rows {shown}; row 0 is the first data row)",
            file=sys.stderr,
        )
