"""Tables in chunks (CSV, TSV, JSON lines, Parquet) and a writer that resumes whatever a killed run left."""

import json
import os
import sys

import pytest

pa = pytest.importorskip("pyarrow", reason="earlyexit_kernels.integrations.table_io reads and writes through pyarrow")
pytest.importorskip("pandas", reason="earlyexit_kernels.integrations.table_io writes JSON lines through pandas")
import pyarrow.parquet as pq  # noqa: E402

from earlyexit_kernels.integrations.table_io import ChunkWriter, TableError, check_writable, read_chunks  # noqa: E402

FORMATS = ("csv", "tsv", "jsonl", "parquet")
# Texts a hand-written parser gets wrong: separators, quotes, newlines inside a field, "007", non-ASCII.
TRICKY = ["plain", "a, comma", "a\ttab", 'say "hi"', "two\nlines", "007", "café ☕", "", "x\r\ny", " spaced "]


def _rows(count, start=0):
    return {
        "id": [start + i for i in range(count)],
        "text": [f"{TRICKY[(start + i) % len(TRICKY)]} {start + i}" for i in range(count)],
    }


def _write_input(path, columns, row_group_size=None):
    import pandas as pd

    frame = pd.DataFrame(columns)
    kind = path.suffix[1:]
    if kind in ("csv", "tsv"):
        frame.to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_size)
    return str(path)


def _output_chunks(count=5, rows=3):
    """Output chunks as the command line makes them: input columns, then label, score, exit_layer, layers_run."""
    chunks = []
    for c in range(count):
        columns = _rows(rows, start=c * rows)
        ids = [None if i % 4 == 1 else i for i in columns["id"]]  # an int column with nulls stays ints
        chunks.append(
            pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "text": columns["text"],
                    "label": pa.array(["pos", None, "neg"][:rows] * (rows // 3) + ["pos"] * (rows % 3), pa.string()),
                    "score": pa.array([0.1 + 1e-9 * i for i in columns["id"]], pa.float64()),
                    "exit_layer": pa.array([1 + i % 4 for i in columns["id"]], pa.int64()),
                    "layers_run": pa.array([1 + i % 4 for i in columns["id"]], pa.int64()),
                }
            )
        )
    return chunks


def _written(path, chunks, **kwargs):
    writer = ChunkWriter(str(path), **kwargs)
    for chunk in chunks:
        writer.write(chunk)
    writer.finish()
    return writer


def _read_back(path):
    tables = list(read_chunks(str(path), chunk_rows=1000))
    return pa.concat_tables(tables)


@pytest.mark.parametrize("kind", FORMATS)
def test_chunks_hold_every_row_once_in_order_with_its_exact_text(tmp_path, kind):
    source = _write_input(tmp_path / f"in.{kind}", _rows(5000), row_group_size=700)
    chunks = list(read_chunks(source, chunk_rows=256))
    assert [t.num_rows for t in chunks] == [256] * 19 + [136]
    table = pa.concat_tables(chunks)
    assert table.column("text").to_pylist() == _rows(5000)["text"]
    ids = table.column("id").to_pylist()
    assert ids == ([str(i) for i in range(5000)] if kind in ("csv", "tsv") else list(range(5000)))

    # a resume starts after the rows done, across chunk and row-group boundaries
    rest = pa.concat_tables(read_chunks(source, chunk_rows=256, skip_rows=1401))
    assert rest.column("text").to_pylist() == _rows(5000)["text"][1401:]


def test_csv_is_read_as_text_and_written_back_as_it_was(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text('code,amount,text\n007,1.50,"a ""quoted"", text"\n,2,\n')
    table = next(read_chunks(str(source)))
    assert table.to_pydict() == {"code": ["007", ""], "amount": ["1.50", "2"], "text": ['a "quoted", text', ""]}
    _written(tmp_path / "out.csv", [table])
    assert next(read_chunks(str(tmp_path / "out.csv"))).to_pydict() == table.to_pydict()


def test_a_file_without_rows_still_gives_its_columns(tmp_path):
    (tmp_path / "header.csv").write_text("id,text\n")
    (tmp_path / "nothing.jsonl").write_text("\n")
    pq.write_table(
        pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet"
    )
    assert [t.column_names for t in read_chunks(str(tmp_path / "header.csv"))] == [["id", "text"]]
    assert [t.column_names for t in read_chunks(str(tmp_path / "e.parquet"))] == [["id", "text"]]
    assert [(t.num_rows, t.num_columns) for t in read_chunks(str(tmp_path / "nothing.jsonl"))] == [(0, 0)]
    # every row skipped (a resume of a finished file): one empty chunk, still with the columns
    source = _write_input(tmp_path / "in.csv", _rows(10))
    assert [(t.num_rows, t.column_names) for t in read_chunks(source, 4, skip_rows=10)] == [(0, ["id", "text"])]


def test_a_json_text_column_that_starts_with_nulls_is_text(tmp_path):
    # pyarrow types a column from the first block it reads: a long run of nulls would type it null
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "text": None}) for i in range(100000)] + [json.dumps({"id": 100000, "text": "w1"})]
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(TableError, match="changed from null to string"):
        list(read_chunks(str(source), chunk_rows=8192))
    table = pa.concat_tables(read_chunks(str(source), chunk_rows=8192, text_columns=["text"]))
    assert table.column("text").type == pa.string() and table.column("text").to_pylist()[-2:] == [None, "w1"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("in.xlsx", b"", "unknown format .xlsx; use .csv, .tsv, .jsonl or .parquet"),
        ("in", b"", r"unknown format \(no extension\)"),
        ("in.parquet", b"not a parquet file", "cannot read .*in.parquet as parquet"),
        ("in.jsonl", b'{"text": "a"}\n{"text": "b', "cannot read .*in.jsonl as jsonl"),
        ("in.csv", b"", "cannot read .*in.csv as csv"),
        ("in.csv", b"a,b\n1,2,3\n", "cannot read .*in.csv as csv.*Expected 2 columns"),
        ("in.csv", b"text\n\xff\xfe\n", "cannot read .*in.csv as csv"),
    ],
)
def test_a_file_that_cannot_be_read_is_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TableError, match=message):
        list(read_chunks(str(tmp_path / name)))


def test_a_missing_input_and_a_missing_pyarrow_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(TableError, match="does not exist"):
        list(read_chunks(str(tmp_path / "absent.csv")))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(TableError, match="needs pyarrow \\(the cli extra\\): pip install pyarrow pandas"):
        list(read_chunks(str(tmp_path / "absent.csv")))


@pytest.mark.parametrize("kind", FORMATS)
def test_written_chunks_read_back_as_they_were(tmp_path, kind):
    chunks = _output_chunks()
    _written(tmp_path / f"out.{kind}", chunks)
    back = _read_back(tmp_path / f"out.{kind}")
    expected = pa.concat_tables(chunks)
    assert back.column_names == expected.column_names
    if kind in ("csv", "tsv"):  # read back as text; nulls are empty fields
        assert back.column("text").to_pylist() == expected.column("text").to_pylist()
        assert back.column("id").to_pylist() == ["" if v is None else str(v) for v in expected["id"].to_pylist()]
        assert [float(v) for v in back.column("score").to_pylist()] == expected.column("score").to_pylist()
    elif kind == "jsonl":  # pandas writes floats with 15 significant digits
        assert back.drop(["score"]).to_pydict() == expected.drop(["score"]).to_pydict()
        assert back.column("score").to_pylist() == pytest.approx(expected.column("score").to_pylist(), rel=1e-14)
    else:
        assert back.to_pydict() == expected.to_pydict()
    assert not os.path.exists(f"{tmp_path}/out.{kind}.eek-progress.json")
    assert not os.path.exists(f"{tmp_path}/out.{kind}.eek-parts")


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_resume_after_a_kill_at_any_byte_of_a_chunk(tmp_path, monkeypatch, kind):
    """A kill while chunk 3 is being appended leaves any prefix of its bytes (none, half a line,
    a quoted field cut after its newline, or all of it before the progress was recorded)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # what is tested is the bytes left, not the disk
    chunks = _output_chunks()
    whole = tmp_path / f"whole.{kind}"
    _written(whole, chunks)
    reference = whole.read_bytes()

    cut = tmp_path / f"cut.{kind}"
    progress = tmp_path / f"cut.{kind}.eek-progress.json"
    writer = ChunkWriter(str(cut))
    for chunk in chunks[:3]:
        writer.write(chunk)
    start, recorded = writer.bytes_done, progress.read_bytes()
    writer.write(chunks[3])
    end = writer.bytes_done
    assert end - start > 80  # a chunk of several rows (97 bytes as CSV)

    for size in range(end - start + 1):
        cut.write_bytes(reference[: start + size])
        progress.write_bytes(recorded)
        resumed = ChunkWriter(str(cut), resume=True)
        assert resumed.rows_done == 9
        for chunk in chunks[3:]:
            resumed.write(chunk)
        resumed.finish()
        assert cut.read_bytes() == reference, f"killed after {size} bytes of chunk 3"


def test_parquet_resume_after_a_kill_while_a_part_is_written(tmp_path):
    chunks = _output_chunks()
    whole = tmp_path / "whole.parquet"
    _written(whole, chunks)
    reference = pq.read_table(whole)
    part_bytes = (tmp_path / "part.parquet").as_posix()
    pq.write_table(chunks[3], part_bytes)
    complete = open(part_bytes, "rb").read()

    cut = tmp_path / "cut.parquet"
    parts = tmp_path / "cut.parquet.eek-parts"
    for size in (0, 4, len(complete) // 2, len(complete) - 1, len(complete)):  # no footer up to the last byte
        writer = ChunkWriter(str(cut), overwrite=True)
        for chunk in chunks[:3]:
            writer.write(chunk)
        (parts / ".part-000003.parquet.tmp").write_bytes(complete[:size])
        resumed = ChunkWriter(str(cut), resume=True)
        assert resumed.rows_done == 9
        for chunk in chunks[3:]:
            resumed.write(chunk)
        resumed.finish()
        assert pq.read_table(cut).equals(reference)
        assert not parts.exists()


def test_parquet_resume_when_a_part_was_renamed_but_its_progress_not_recorded(tmp_path, monkeypatch):
    chunks = _output_chunks()
    reference_path = tmp_path / "whole.parquet"
    _written(reference_path, chunks)
    cut = tmp_path / "cut.parquet"
    writer = ChunkWriter(str(cut))
    for chunk in chunks[:2]:
        writer.write(chunk)
    monkeypatch.setattr(ChunkWriter, "_save_progress", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writer.write(chunks[2])
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut.parquet.eek-progress.json").read_text())["rows"] == 6
    resumed = ChunkWriter(str(cut), resume=True)
    assert resumed.rows_done == 9  # the renamed part is complete: its rows are done
    for chunk in chunks[3:]:
        resumed.write(chunk)
    resumed.finish()
    assert pq.read_table(cut).equals(pq.read_table(reference_path))


def test_parquet_killed_while_finishing(tmp_path, monkeypatch):
    chunks = _output_chunks()
    cut = tmp_path / "cut.parquet"
    reference = pa.concat_tables(chunks)

    # killed after the output is in place, before the progress file is removed: resuming redoes finish
    writer = ChunkWriter(str(cut))
    for chunk in chunks:
        writer.write(chunk)
    monkeypatch.setattr(ChunkWriter, "_clear_parts", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    monkeypatch.undo()
    assert pq.read_table(cut).equals(reference)
    # the progress file went first: the output is complete and there is nothing to resume
    with pytest.raises(TableError, match="nothing to resume"):
        ChunkWriter(str(cut), resume=True)
    _written(cut, chunks[:1], overwrite=True)  # a new run clears the parts left behind
    assert pq.read_table(cut).equals(chunks[0])


@pytest.mark.parametrize("kind", FORMATS)
def test_resume_refuses_what_it_cannot_continue(tmp_path, kind):
    chunks = _output_chunks()
    out = tmp_path / f"out.{kind}"
    progress = tmp_path / f"out.{kind}.eek-progress.json"
    run = {"input": "/data/a.csv", "text_column": "text", "pair_column": None}

    writer = ChunkWriter(str(out), run=run)
    writer.write(chunks[0])
    with pytest.raises(TableError, match=r"exists; pass --resume to continue it or --overwrite"):
        ChunkWriter(str(out))
    other = {**run, "input": "/data/b.csv"}
    with pytest.raises(TableError, match=r"started with input='/data/a.csv', not input='/data/b.csv'"):
        ChunkWriter(str(out), resume=True, run=other)
    assert ChunkWriter(str(out), resume=True, run=run).rows_done == 3
    if kind != "parquet":
        os.truncate(out, 10)
        with pytest.raises(TableError, match="shorter than the .* bytes its progress file records"):
            ChunkWriter(str(out), resume=True, run=run)
    progress.write_text('{"rows": 3, "by')
    with pytest.raises(TableError, match="unreadable.*--overwrite"):
        ChunkWriter(str(out), resume=True, run=run)
    _written(tmp_path / f"done.{kind}", chunks[:1], run=run)
    with pytest.raises(TableError, match="nothing to resume: .* finished"):
        ChunkWriter(str(tmp_path / f"done.{kind}"), resume=True, run=run)

    # killed before anything was written (no output, no progress): --resume starts from row 0
    fresh = ChunkWriter(str(tmp_path / f"fresh.{kind}"), resume=True, run=run)
    assert fresh.rows_done == 0
    fresh.write(chunks[0])
    fresh.finish()
    assert _read_back(tmp_path / f"fresh.{kind}").num_rows == 3


def test_columns_a_format_cannot_hold_are_found_before_writing(tmp_path):
    nested = pa.table({"tags": pa.array([["a", "b"]]), "text": ["w1"]})
    for kind in ("csv", "tsv"):
        with pytest.raises(TableError, match=rf"tags: list<item: string>.*as {kind}.*write OUTPUT as \.parquet"):
            check_writable(str(tmp_path / f"out.{kind}"), nested)
    check_writable(str(tmp_path / "out.jsonl"), nested)
    check_writable(str(tmp_path / "out.parquet"), nested)
    with pytest.raises(TableError, match="as jsonl"):
        check_writable(str(tmp_path / "out.jsonl"), pa.table({"raw": pa.array([b"\xff"])}))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_delimited_output_quotes_only_fields_that_need_it(tmp_path, kind):
    """Numbers are never quoted, nor text columns that hold numbers (input columns are read as
    text); a field with the delimiter, a quote or a line break is, and everything reads back."""
    sep = "\t" if kind == "tsv" else ","
    table = pa.table(
        {
            "id": pa.array(["1", "007"], pa.string()),
            "text": ["plain", f'a{sep} "quoted"\nfield'],
            "label": pa.array(["pos", None], pa.string()),
            "score": pa.array([0.5, 0.125], pa.float64()),
            "exit_layer": pa.array([1, 12], pa.int64()),
        }
    )
    path = tmp_path / f"out.{kind}"
    _written(path, [table])
    text = path.read_text()
    assert text.startswith(sep.join(["id", "text", "label", "score", "exit_layer"]) + "\n")
    assert sep.join(["1", "plain", "pos", "0.5", "1"]) + "\n" in text
    assert text.endswith(sep.join(["007", f'"a{sep} ""quoted""\nfield"', "", "0.125", "12"]) + "\n")
    back = next(read_chunks(str(path))).to_pydict()
    assert back["text"] == table.column("text").to_pylist() and back["id"] == ["1", "007"]
    assert back["score"] == ["0.5", "0.125"] and back["label"] == ["pos", ""]
