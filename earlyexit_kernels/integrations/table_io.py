"""Tables in and out for the command line: CSV, TSV, JSON lines and Parquet, read and written in chunks.

Reading never holds more than one chunk: pyarrow's streaming CSV and JSON readers and
Parquet's row-group batches. CSV and TSV columns are read as text, so what is written
back is what was read ("007" stays "007"). A file with no rows still gives one empty
chunk with its columns, so that the output keeps them.

Writing is resumable, whatever a killed run left behind:

- CSV, TSV, JSON lines: after each chunk is appended and fsynced, a progress file next to
  the output (``OUTPUT.eek-progress.json``, fsynced, then renamed into place) records how
  many input rows are done and how many bytes of the output hold them. ``--resume``
  truncates the output to that many bytes and skips that many input rows. What a kill
  leaves after the recorded bytes (half a CSV line, half a JSON line, or a whole chunk
  whose progress was not yet recorded) is cut off and written again; the output is never
  parsed to find where it ends (a quoted CSV field may hold newlines).
- Parquet has its footer at the end, so a half-written file cannot be appended to. Each
  chunk is written as a complete part file ``OUTPUT.eek-parts/part-NNNNNN.parquet``
  (written under a temporary name, then renamed): a part either exists whole or not at
  all, and the rows done are the rows of the parts. ``finish`` assembles the parts into a
  temporary file renamed onto OUTPUT, removes the progress file, then the parts.

The progress file also records what the run was started with (``run``: input and
columns); a resume with something else is refused, since its row count would not apply.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from earlyexit_kernels.integrations.extras import install_line

if TYPE_CHECKING:
    from earlyexit_kernels.training.labelled_texts import LabelledTexts

__all__ = [
    "FORMATS",
    "TableError",
    "check_writable",
    "need_pyarrow",
    "read_chunks",
    "read_labelled",
    "ChunkWriter",
    "table_format",
]

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


class TableError(ValueError):
    """A file that cannot be read or written as asked; the message says what to change."""


def table_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise TableError(f"{path}: unknown format {suffix or '(no extension)'}; use .csv, .tsv, .jsonl or .parquet")
    return FORMATS[suffix]


def need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise TableError(f"reading and writing tables needs pyarrow (the cli extra): {install_line('cli')}") from error


def read_chunks(path: str, chunk_rows: int = 4096, skip_rows: int = 0, text_columns=()) -> Iterator:
    """pyarrow Tables of at most ``chunk_rows`` rows of ``path``, after the first ``skip_rows``.

    ``text_columns`` of a JSON lines file are read as strings whatever their first values
    (a text column that starts with nulls would otherwise be typed null and fail later).
    At least one Table is yielded: an empty one with the file's columns if no row is left.
    """
    need_pyarrow()
    import pyarrow as pa

    kind = table_format(path)
    if not Path(path).is_file():
        raise TableError(f"input {path} does not exist or is not a file")
    try:
        schema, batches, skip_rows = _open(path, kind, chunk_rows, skip_rows, text_columns)
        pending, pending_rows, yielded = [], 0, False
        for batch in batches:
            if skip_rows:
                dropped = min(skip_rows, batch.num_rows)
                batch, skip_rows = batch.slice(dropped), skip_rows - dropped
            while batch.num_rows:
                take = min(chunk_rows - pending_rows, batch.num_rows)
                pending.append(batch.slice(0, take))
                pending_rows += take
                batch = batch.slice(take)
                if pending_rows == chunk_rows:
                    yield pa.Table.from_batches(pending)
                    pending, pending_rows, yielded = [], 0, True
        if pending or not yielded:
            yield pa.Table.from_batches(pending, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as error:
        raise TableError(f"cannot read {path} as {kind}: {error}") from error


def _open(path: str, kind: str, chunk_rows: int, skip_rows: int, text_columns):
    """(schema, record batches, rows still to skip) of ``path``."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if kind == "parquet":
        file = pq.ParquetFile(path)
        groups, first = [], 0
        for group in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if first + rows <= skip_rows:  # a resume skips whole row groups without reading them
                first += rows
            else:
                groups.append(group)
        return file.schema_arrow, file.iter_batches(batch_size=chunk_rows, row_groups=groups), skip_rows - first
    if kind == "jsonl":
        if not _has_a_record(path):
            return pa.schema([]), iter(()), 0  # no record: a valid, empty JSON lines file
        with pa_json.open_json(path) as probe:
            names = probe.schema.names
        text = pa.schema([(name, pa.string()) for name in text_columns if name in names])
        parse = pa_json.ParseOptions(explicit_schema=text, unexpected_field_behavior="infer")
        reader = pa_json.open_json(path, parse_options=parse)
        schema = pa.schema([reader.schema.field(name) for name in names])  # the explicit fields come first
        return schema, (batch.select(names) for batch in reader), skip_rows
    parse = pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
    with pa_csv.open_csv(path, parse_options=parse) as probe:
        names = probe.schema.names
    text = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=False)
    reader = pa_csv.open_csv(path, parse_options=parse, convert_options=text)
    return reader.schema, reader, skip_rows


def _has_a_record(path: str) -> bool:
    """Whether the JSON lines file has a line that is not blank; reads up to the first one."""
    with open(path, "rb") as file:
        return any(line.strip() for line in file)


class ChunkWriter:
    """Appends chunks (pyarrow Tables) to ``path`` and records progress; see the module docstring.

    ``resume``: continue what a previous run with the same ``run`` left (from the start if
    it left nothing). ``overwrite``: replace an existing ``path``. ``rows_done``: input
    rows already in the output.
    """

    def __init__(self, path: str, *, resume: bool = False, overwrite: bool = False, run: dict | None = None):
        need_pyarrow()
        self.path = Path(path)
        self.kind = table_format(path)
        self.progress_path = self.path.with_name(self.path.name + ".eek-progress.json")
        self.parts = self.path.with_name(self.path.name + ".eek-parts")
        self.run = run or {}
        self.rows_done, self.bytes_done = 0, 0
        if resume and self.progress_path.exists():
            self._resume()
        elif resume and self.path.exists():
            raise TableError(
                f"nothing to resume: {path} has no {self.progress_path.name}, so the run that wrote it finished "
                f"(or it was not written by this command); pass --overwrite instead of --resume to write it anew"
            )
        else:  # a new run (or a resume of a run killed before it wrote anything)
            if (self.path.exists() or self.progress_path.exists()) and not overwrite:
                raise TableError(f"output {path} exists; pass --resume to continue it or --overwrite to replace it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.kind == "parquet":
                self._clear_parts()
                self.parts.mkdir()
                self.path.unlink(missing_ok=True)
            else:
                self.path.write_bytes(b"")
            self._save_progress()

    def _resume(self) -> None:
        try:
            progress = json.loads(self.progress_path.read_text())
            rows, size, run = int(progress["rows"]), int(progress["bytes"]), progress.get("run", {})
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise TableError(
                f"cannot resume: {self.progress_path} is unreadable ({error}); pass --overwrite to start anew"
            ) from None
        if run != self.run:
            changed = sorted(key for key in {*run, *self.run} if run.get(key) != self.run.get(key))
            raise TableError(
                f"cannot resume {self.path}: it was started with "
                + ", ".join(f"{key}={run.get(key)!r}" for key in changed)
                + ", not "
                + ", ".join(f"{key}={self.run.get(key)!r}" for key in changed)
                + "; resume with the same arguments, or pass --overwrite to start anew"
            )
        if self.kind == "parquet":
            self.parts.mkdir(exist_ok=True)
            for temporary in self.parts.glob(".part-*"):
                temporary.unlink()
            self.rows_done = sum(self._part_rows(part) for part in self._complete_parts())
            return
        if not self.path.is_file() or self.path.stat().st_size < size:
            raise TableError(
                f"cannot resume: {self.path} is shorter than the {size} bytes its progress file records "
                f"(it was changed since); pass --overwrite to start anew"
            )
        with open(self.path, "r+b") as file:
            file.truncate(size)
        self.rows_done, self.bytes_done = rows, size

    def write(self, table) -> None:
        """Append ``table``'s rows; progress is recorded once they are on disk."""
        if self.kind == "parquet":
            self._write_part(table)
        else:
            with open(self.path, "ab") as file:
                file.write(_encode(self.kind, table, header=self.bytes_done == 0, path=self.path))
                file.flush()
                os.fsync(file.fileno())
                self.bytes_done = file.tell()
        self.rows_done += table.num_rows
        self._save_progress()

    def finish(self) -> None:
        """Assemble the Parquet parts into the output; remove the progress file (and the parts)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            temporary = self.path.with_name(self.path.name + ".eek-tmp")
            writer = None
            try:
                for part in self._complete_parts():
                    table = pq.read_table(part)
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, table.schema)
                    writer.write_table(table.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                import pyarrow as pa

                pq.write_table(pa.table({}), temporary)
            os.replace(temporary, self.path)
        # Progress goes before the parts: killed in between, the output is complete and
        # nothing is left to resume (leftover parts are cleared by the next run).
        self.progress_path.unlink(missing_ok=True)
        self._clear_parts()

    def _write_part(self, table) -> None:
        import pyarrow.parquet as pq

        parts = self._complete_parts()
        index = int(parts[-1].name[len("part-") : -len(".parquet")]) + 1 if parts else 0
        temporary = self.parts / f".part-{index:06d}.parquet.tmp"
        pq.write_table(table, temporary)
        _fsync(temporary)
        os.replace(temporary, self.parts / f"part-{index:06d}.parquet")

    def _complete_parts(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.exists() else []

    @staticmethod
    def _part_rows(part: Path) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(part).metadata.num_rows

    def _clear_parts(self) -> None:
        if self.parts.exists():
            for entry in self.parts.iterdir():
                entry.unlink()
            self.parts.rmdir()

    def _save_progress(self) -> None:
        temporary = self.progress_path.with_name(self.progress_path.name + ".tmp")
        temporary.write_text(json.dumps({"rows": self.rows_done, "bytes": self.bytes_done, "run": self.run}))
        _fsync(temporary)
        os.replace(temporary, self.progress_path)


def check_writable(path: str, table) -> None:
    """``TableError`` if the columns of ``table`` cannot be written to ``path``'s format (lists to CSV...)."""
    need_pyarrow()
    kind = table_format(path)
    if kind != "parquet":
        _encode(kind, table.slice(0, 1), header=True, path=path)


def _encode(kind: str, table, header: bool, path) -> bytes:
    import pyarrow as pa

    try:
        if kind == "jsonl":  # pyarrow writes no JSON; pandas does, with Arrow types kept (ints stay ints)
            import pandas as pd

            frame = table.to_pandas(types_mapper=pd.ArrowDtype)
            text = frame.to_json(
                orient="records", lines=True, force_ascii=False, date_format="iso", double_precision=15
            )
            return (text if text.endswith("\n") or not text else text + "\n").encode()
        return _delimited(table, "\t" if kind == "tsv" else ",", header)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as error:
        columns = ", ".join(f"{field.name}: {field.type}" for field in table.schema)
        raise TableError(
            f"cannot write the columns ({columns}) as {kind} to {path}: {error}; write OUTPUT as .parquet instead"
        ) from None


def _delimited(table, delimiter: str, header: bool) -> bytes:
    """CSV / TSV text of ``table``: a field is quoted only when its text needs it (a delimiter,
    a quote or a line break in it), so numbers are never quoted, nor the input's text columns
    that hold numbers (read as text to keep "007"). Each value is formatted by Arrow, as
    pyarrow's CSV writer formats it; pyarrow's writer itself quotes every string."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column in table.columns:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())  # raises for lists and structs: not CSV
        columns.append(["" if value is None else value for value in column.to_pylist()])
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    if header:
        writer.writerow(table.column_names)
    writer.writerows(zip(*columns))
    return out.getvalue().encode()


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


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
    (then :class:`~earlyexit_kernels.training.labelled_texts.DataError`). Null or empty texts are read as the empty text; a file with
    no rows, a missing text column or a non-text value is a ``DataError``; the training reads the result (class ids, tokenized rows, batches) in
    :mod:`earlyexit_kernels.training.labelled_texts`.
    """
    from earlyexit_kernels.training.labelled_texts import DataError, LabelledTexts

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
        from earlyexit_kernels.training.labelled_texts import DataError

        raise DataError(f"{path}, row {row}: column {column!r} holds {type(value).__name__} {value!r}, not text")
    return value
