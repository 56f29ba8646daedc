"""Reading local data files (data.source: local) into records: .txt, .jsonl, .json, .csv and .parquet.

The prepare stage reads every record of them (``prepare.sources``); the check stage reads each file up to
its first record (``first_record``, through ``inputs``), with the same readers and so the same messages,
before DVC deletes prepare's outputs. Nothing heavy is imported (pyarrow only for a parquet file).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qlorapipe.errors import UserError


@dataclass(frozen=True)
class Record:
    """One raw row: its columns and where it came from (for messages)."""

    columns: dict = field(hash=False)
    where: str


def _decode(raw: bytes, where: str) -> str:
    """UTF-8 text without a byte-order mark (Excel's "CSV UTF-8" and Notepad write one; kept, it would glue
    itself to the first column's name or the first document's text)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file "
                        "as UTF-8 or fix data.path") from None


def _read_txt(file: Path):
    # One document per file; blank-line separated paragraphs stay together.
    yield Record({"text": _decode(file.read_bytes(), str(file))}, str(file))


def _read_jsonl(file: Path):
    with file.open("rb") as lines:  # line by line: the check stage reads only the first record
        for line_no, raw in enumerate(lines, start=1):
            line = _decode(raw, f"{file}:{line_no}")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}:{line_no}: not valid JSON ({exc.msg}); fix the line or data.path") from None
            yield _record(value, f"{file}:{line_no}")


def _read_json(file: Path):
    try:
        value = json.loads(_decode(file.read_bytes(), str(file)))
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file or data.path") from None
    # A list of records, or {"data": [...]}-style: one key holding the list.
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise UserError(f"{file}: expected a JSON list of records, got {type(value).__name__}")
    for row, item in enumerate(value, start=1):
        yield _record(item, f"{file}:{row}")


def _csv_rows(text):
    csv.field_size_limit(sys.maxsize)  # a cell may hold a whole chapter (the default stops at 131,072 characters)
    # strict: a quote left open is an error, not the rest of the file read into one cell
    return csv.DictReader(text, strict=True)


def _invalid_csv(file: Path, row: int, exc: csv.Error) -> UserError:
    return UserError(f"{file}:{row}: not valid CSV ({exc}); fix the row or data.path")


def _read_csv(file: Path):
    reader = _csv_rows(io.StringIO(_decode(file.read_bytes(), str(file)), newline=""))
    # Row numbers count the header as row 1, as spreadsheets show them.
    row = 1
    try:
        for row, values in enumerate(reader, start=2):
            yield Record(dict(values), f"{file}:{row}")
    except csv.Error as exc:
        raise _invalid_csv(file, row + 1, exc) from None


def _unreadable_parquet(file: Path, exc: Exception) -> UserError:
    return UserError(f"{file}: not a readable parquet file ({exc.__class__.__name__}: {exc})")


def _read_parquet(file: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise _unreadable_parquet(file, exc) from None
    for row, values in enumerate(table.to_pylist(), start=1):
        yield Record(values, f"{file}:{row}")


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
            ".parquet": _read_parquet}


def first_record(file: Path) -> Record | None:
    """A local data file's first record, read as load_records reads it, and no further where the format
    allows (a .json file is read through; a .parquet file gives its column names, valued None, from its
    footer); None: the file holds no record. The check stage looks at it before DVC deletes prepare's outputs.

    Raises:
        UserError: what load_records would say of the file up to its first record.
    """
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(file)
        except Exception as exc:  # as in _read_parquet
            raise _unreadable_parquet(file, exc) from None
        names = metadata.schema.to_arrow_schema().names
        return Record(dict.fromkeys(names), f"{file}:1") if metadata.num_rows else None
    if file.suffix == ".csv":
        try:
            with file.open(newline="", encoding="utf-8-sig") as text:
                values = next(_csv_rows(text), None)
        except UnicodeDecodeError:
            return next(_read_csv(file), None)  # read through, to name the byte
        except csv.Error as exc:
            raise _invalid_csv(file, 2, exc) from None
        return None if values is None else Record(dict(values), f"{file}:2")
    records = READERS[file.suffix](file)
    try:
        return next(records, None)
    finally:
        records.close()


def too_few_records(origin: str, count: int) -> str:
    """The problem of a source with fewer than the two records a train and an eval split need."""
    return (f"{origin}: {count} record(s); need at least 2, one for training and one for evaluation: add data, "
            "or for raw text use data.format: text with data.text_mode: concat")


def _record(value, where: str) -> Record:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object of columns, got {type(value).__name__}")
    return Record(value, where)
