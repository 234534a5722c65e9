"""Tables in and out for the command line: CSV, TSV, JSON lines and Parquet, read and written in chunks.

Reading never holds more than one chunk: pyarrow's streaming CSV and JSON readers and
Parquet's row-group batches. CSV and TSV columns are read as text, so what is written
back is what was read ("007" stays "007").

Writing is resumable. After each chunk is fully on disk, a progress file next to the
output (``OUTPUT.eek-progress.json``, replaced atomically) records how many input rows
are done and how many bytes of the output hold them. ``--resume`` truncates the output to
that many bytes (dropping a chunk that was half written when the run was killed) and
skips that many input rows, so no row is lost or written twice, whatever a half-written
line looked like (a CSV field may hold newlines). Parquet has its footer at the end, so it
is written as one complete part file per chunk in ``OUTPUT.eek-parts/`` (each renamed
into place when complete) and assembled into OUTPUT at the end. The progress file and
the parts folder are removed when the run finishes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FORMATS", "TableError", "read_chunks", "ChunkWriter", "table_format"]

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


class TableError(ValueError):
    """A file that cannot be read or written as asked; the message says what to change."""


def table_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise TableError(f"{path}: unknown format {suffix or '(no extension)'}; use .csv, .tsv, .jsonl or .parquet")
    return FORMATS[suffix]


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise TableError("reading and writing tables needs pyarrow: pip install 'earlyexit_kernels[cli]'") from error


def read_chunks(path: str, chunk_rows: int = 4096, skip_rows: int = 0) -> Iterator:
    """pyarrow Tables of at most ``chunk_rows`` rows of ``path``, after the first ``skip_rows``."""
    _pyarrow()
    import pyarrow as pa

    kind = table_format(path)
    if not Path(path).is_file():
        raise TableError(f"input {path} does not exist or is not a file")
    try:
        batches = _batches(path, kind, chunk_rows)
        pending, pending_rows = [], 0
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
                    pending, pending_rows = [], 0
        if pending:
            yield pa.Table.from_batches(pending)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as error:
        raise TableError(f"cannot read {path} as {kind}: {error}") from error


def _batches(path: str, kind: str, chunk_rows: int):
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
    elif kind == "jsonl":
        yield from pa_json.open_json(path)
    else:
        parse = pa_csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
        with pa_csv.open_csv(path, parse_options=parse) as probe:
            names = probe.schema.names
        text = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=False)
        yield from pa_csv.open_csv(path, parse_options=parse, convert_options=text)


class ChunkWriter:
    """Appends chunks (pandas DataFrames) to ``path`` and records progress; see the module docstring."""

    def __init__(self, path: str, *, resume: bool = False, overwrite: bool = False):
        _pyarrow()
        self.path = Path(path)
        self.kind = table_format(path)
        self.progress_path = self.path.with_name(self.path.name + ".eek-progress.json")
        self.parts = self.path.with_name(self.path.name + ".eek-parts")
        self.rows_done, self.bytes_done = 0, 0
        self._schema = None
        if resume and self.progress_path.exists():
            progress = json.loads(self.progress_path.read_text())
            self.rows_done, self.bytes_done = progress["rows"], progress["bytes"]
            if self.kind == "parquet":
                self._drop_incomplete_parts()
            else:
                with open(self.path, "r+b") as file:
                    file.truncate(self.bytes_done)
        elif resume:
            raise TableError(
                f"nothing to resume: {self.progress_path.name} is missing (the run that wrote {path} finished, "
                f"or never started); run without --resume"
            )
        else:
            if self.path.exists() and not overwrite:
                raise TableError(f"output {path} exists; pass --resume to continue it or --overwrite to replace it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.kind == "parquet":
                self._clear_parts()
                self.parts.mkdir()
            else:
                self.path.write_bytes(b"")
            self._save_progress()

    def write(self, frame) -> None:
        """Append ``frame``'s rows; progress is recorded once they are on disk."""
        import pyarrow as pa

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.kind == "parquet":
            self._write_part(table)
        else:
            with open(self.path, "ab") as file:
                file.write(self._encode(table, frame, header=self.bytes_done == 0))
                file.flush()
                os.fsync(file.fileno())
                self.bytes_done = file.tell()
        self.rows_done += len(frame)
        self._save_progress()

    def finish(self) -> None:
        """Assemble the Parquet parts into the output; remove the progress file."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            parts = self._complete_parts()
            writer = None
            try:
                for part in parts:
                    table = pq.read_table(part)
                    if writer is None:
                        writer = pq.ParquetWriter(self.path, table.schema)
                    writer.write_table(table.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
            if not parts:
                self._write_empty_parquet()
            self._clear_parts()
        self.progress_path.unlink(missing_ok=True)

    def _encode(self, table, frame, header: bool) -> bytes:
        if self.kind == "jsonl":
            text = frame.to_json(orient="records", lines=True, force_ascii=False)
            return (text if text.endswith("\n") or not text else text + "\n").encode()
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        sink = pa.BufferOutputStream()
        options = pa_csv.WriteOptions(include_header=header, delimiter="\t" if self.kind == "tsv" else ",")
        pa_csv.write_csv(table, sink, write_options=options)
        return sink.getvalue().to_pybytes()

    def _write_part(self, table) -> None:
        import pyarrow.parquet as pq

        index = len(self._complete_parts())
        temporary = self.parts / f".part-{index:06d}.parquet.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, self.parts / f"part-{index:06d}.parquet")

    def _complete_parts(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.exists() else []

    def _drop_incomplete_parts(self) -> None:
        """Every renamed part is complete: the rows done are theirs; a part still being written goes."""
        import pyarrow.parquet as pq

        self.parts.mkdir(exist_ok=True)
        for temporary in self.parts.glob(".part-*"):
            temporary.unlink()
        self.rows_done = sum(pq.ParquetFile(part).metadata.num_rows for part in self._complete_parts())

    def _clear_parts(self) -> None:
        if self.parts.exists():
            for entry in self.parts.iterdir():
                entry.unlink()
            self.parts.rmdir()

    def _write_empty_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({}), self.path)

    def _save_progress(self) -> None:
        temporary = self.progress_path.with_name(self.progress_path.name + ".tmp")
        temporary.write_text(json.dumps({"rows": self.rows_done, "bytes": self.bytes_done}))
        os.replace(temporary, self.progress_path)
