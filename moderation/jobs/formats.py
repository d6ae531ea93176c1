"""File formats of `moderation batch`: CSV and JSONL, either gzip-compressed by extension.

The format follows the file name: `.jsonl` or `.ndjson` is JSON Lines, anything else CSV, and a
trailing `.gz` compresses either; `-` (stdin, stdout) takes the other side's format. The
batch flow (`moderation.jobs.batch`) stays one: it reads `(cells, row)` pairs and writes rows
through a `writerow` writer, whatever the format:

- JSONL input: one JSON object per line. The columns are every key of every object, in the
  order they first appear (`jsonl_keys`, a first pass over the file: one more read and JSON
  decoding of the input, no model work; standard input, which cannot be read twice, takes the
  first object's keys). A key missing from an object reads as a missing column (`MISSING`:
  an empty CSV cell, left out of a JSONL object); a key outside the columns (standard input's
  later keys, or keys an input gained since a resumed job began) is carried as `Extra`, values
  of any JSON type included (the OpenAI samples file scores as is). Why not the first object's
  keys: a CSV output's columns are fixed by its header, and a key the first object lacked had
  no column of its own (its cell went under the scores).
- JSONL output: the input object, then the added fields typed (`flagged` a boolean, scores
  numbers, `error` null when the row was scored).
- gzip output keeps the journal's guarantee (a commit's end is a place to truncate and append
  to): every commit is one complete gzip member, and a gzip file of several members is one
  file to every reader (RFC 1952; `zcat`, Python's gzip). Members carry no timestamp, so a
  resumed job writes the bytes an uninterrupted one writes.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from moderation.core.errors import prefix
from moderation.jobs.csv_input import Row

CSV = "csv"
JSONL = "jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class FormatError(Exception):
    """A JSONL line that is not a JSON object (a usage error of the whole job)."""


READ_ERRORS: tuple[type[Exception], ...] = (
    UnicodeDecodeError, csv.Error, gzip.BadGzipFile, zlib.error, EOFError, FormatError,
)  # fmt: skip
"""What reading a broken input raises, in either format."""


def _plain(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def is_gzip(path: str) -> bool:
    return path != "-" and path.endswith(".gz")


def format_of(path: str, other: str = "-") -> str:
    """CSV or JSONL by the file name; `-` takes the other side's (CSV when both are `-`)."""
    name = path if path != "-" else other
    return JSONL if _plain(name).lower().endswith(JSONL_SUFFIXES) else CSV


def binary_input(raw: io.RawIOBase, path: str) -> IO[bytes]:
    """The input's bytes: decompressed when the name ends in .gz."""
    binary: Any = io.BufferedReader(raw)
    if is_gzip(path):
        binary = gzip.GzipFile(fileobj=binary, mode="rb")
    return binary  # type: ignore[no-any-return]


def text_input(raw: io.RawIOBase, path: str, encoding: str) -> io.TextIOWrapper:
    """The input as text: decompressed when the name ends in .gz."""
    return io.TextIOWrapper(binary_input(raw, path), encoding=encoding, newline="")  # type: ignore[type-var]


class GzipMembers(io.TextIOBase):
    """A text file written as gzip members, one per flush: what the journal commits ends a
    complete member, so truncating there and appending another gives a valid file."""

    def __init__(self, raw: IO[bytes], encoding: str = "utf-8"):
        self.raw, self.encoding_name = raw, encoding
        self.pending: list[str] = []

    def write(self, text: str) -> int:
        self.pending.append(text)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            data = "".join(self.pending).encode(self.encoding_name)
            self.pending = []
            self.raw.write(gzip.compress(data, mtime=0))
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self.raw.truncate(size)

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # flushes the last member while the file is open
        self.raw.close()


def open_output(path: str, mode: str) -> IO[str]:
    """OUT for writing ("w") or for appending after the committed prefix ("r+")."""
    if is_gzip(path):
        raw = open(path, "r+b" if mode == "r+" else "wb")  # noqa: SIM115
        return GzipMembers(raw)  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8", newline="")


# ------------------------------------------------------------------------------ JSONL


@dataclass(frozen=True)
class Extra:
    """A key of a JSONL row that the first row (the header) lacked, carried to the output."""

    key: str
    value: Any


MISSING: Any = object()
"""A header key that a JSONL row lacks: left out of its output, like a short CSV row's cells."""


def jsonl_keys(binary: IO[bytes], encoding: str) -> list[str]:
    """Every key of a JSONL input's objects, in the order they first appear. Lines that are not
    JSON objects are passed over (the reading pass stops at the first, naming it; the keys
    after it are the columns a resumed job needs once the line is fixed)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    keys: dict[str, None] = {}  # insertion-ordered, as a set is not
    try:
        for data in binary:
            try:
                line = decoder.decode(data)
                value = json.loads(line) if line.strip() else None
            except ValueError:  # not UTF-8 (the decoder starts afresh), not JSON
                decoder.reset()
                continue
            if isinstance(value, dict):
                keys.update(dict.fromkeys(value))
    except READ_ERRORS:  # a broken gzip stream: the reading pass says where
        pass
    return list(keys)


class JsonlReader:
    """Rows of a JSONL input as the batch flow reads CSV rows: a header, then (cells, row).
    The header is `columns` (see `jsonl_keys`) or, without it, the first object's keys."""

    def __init__(self, text: IO[str], name: str, columns: list[str] | None = None):
        self.name = name
        self.lines = iter(text)
        self.number = 0
        first = self._next_object()
        if first is None:
            raise FormatError(f"{name}: empty file, no JSON object")
        self.header: list[str] = list(first) if columns is None else columns
        self.first: dict[str, Any] | None = first

    def _next_object(self) -> dict[str, Any] | None:
        for line in self.lines:
            self.number += 1
            if not line.strip():
                continue  # a blank line (often the last) is no row
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise FormatError(f"{self.name}: line {self.number} is not JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise FormatError(f"{self.name}: line {self.number} is not a JSON object")
            return value
        return None

    def rows(self) -> Iterator[tuple[list[Any], dict[str, Any]]]:
        while True:
            obj = self.first if self.first is not None else self._next_object()
            self.first = None
            if obj is None:
                return
            cells = [obj.get(k, MISSING) for k in self.header]
            known = self.known
            cells += [Extra(k, v) for k, v in obj.items() if k not in known]
            # The row's own keys only (a column it lacks reads as None all the same): a file
            # of many sparse keys has hundreds of columns.
            yield cells, {k: cell_text(v) for k, v in obj.items()}

    @functools.cached_property
    def known(self) -> frozenset[str]:
        return frozenset(self.header)


def jsonl_rows(reader: JsonlReader) -> Iterator[Row]:
    """The reader's rows as the batch flow reads every format's."""
    for cells, values in reader.rows():
        yield Row(reader.number, cells, values=values)


def jsonl_columns(path: str, encoding: str) -> list[str]:
    """Every key of a JSONL input file (`jsonl_keys`: a first pass over it)."""
    with open(path, "rb", buffering=0) as raw:
        return jsonl_keys(binary_input(raw, path), encoding)


def keys_outside_the_columns(
    rows: Iterator[Row], columns: list[str], added: list[str], *, csv_output: bool
) -> Iterator[Row]:
    """JSONL rows whose keys have no place in the output, made error rows naming them (the
    row's other keys are copied): in a CSV output, a key outside the header's columns (an
    input that gained it after a resumed job began); in a JSONL output, a key the output adds
    (standard input, not scanned first), which the added field would overwrite."""
    n, reserved = len(columns), frozenset(added)
    for row in rows:
        extra = [cell.key for cell in row.cells[n:] if isinstance(cell, Extra)]
        refused = extra if csv_output else [k for k in extra if k in reserved]
        if not refused:
            yield row
            continue
        names = ", ".join(repr(prefix(k)) for k in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        why = (
            "not columns of the output (the input gained them after this job began: rerun "
            "with --overwrite to give them columns)"
            if csv_output
            else "fields the output adds (rename them in the input)"
        )
        kept = (
            row.cells[:n]
            if csv_output
            else [c for c in row.cells if not (isinstance(c, Extra) and c.key in refused)]
        )
        error = f"line {row.line}: key(s) {names}{more} are {why}; the other keys are copied"
        yield Row(row.line, kept, error, row.values)


def cell_text(value: Any) -> str | None:
    """A JSONL value where the batch expects text: a string as is, None when absent, any
    other value as its JSON (a conversation's list of messages, a number)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_INTS = ("context_tokens", "context_messages_dropped")
_NULLABLE = ("category", "paper_category", "error")


def _typed(column: str, cell: str) -> Any:
    if column == "flagged":
        return None if cell == "" else cell == "true"
    if column.startswith("score_"):
        return None if cell == "" else float(cell)
    if column in _INTS:
        return None if cell == "" else int(cell)
    if column in _NULLABLE:
        return cell or None
    return cell


class JsonlWriter:
    """`writerow` as csv.writer has it: each row becomes one JSON object (the header row,
    the columns themselves, is not written); the input's values keep their JSON types."""

    def __init__(self, out: IO[str], input_columns: int, columns: list[str]):
        self.out = out
        self.input_columns = input_columns
        self.columns = columns

    def writerow(self, values: list[Any]) -> None:
        if values == self.columns:
            return  # the header: JSON objects name their own keys
        n = self.input_columns
        added_count = len(self.columns) - n
        cells, added = values[:-added_count], values[-added_count:]
        obj: dict[str, Any] = {}
        for key, value in zip(self.columns[:n], cells[:n], strict=False):
            if value is not MISSING:
                obj[key] = value
        for extra in cells[n:]:
            if isinstance(extra, Extra):
                obj[extra.key] = extra.value
        for column, cell in zip(self.columns[n:], added, strict=True):
            obj[column] = _typed(column, cell)
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")


def csv_cell(value: Any) -> Any:
    """A JSONL input's value in a CSV output: text as is, absent as empty, any other value as
    its JSON. (A key outside the columns never gets here: its row is an error row that names
    it, `keys_outside_the_columns`.)"""
    if isinstance(value, str):
        return value
    if value is MISSING or value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


class CsvWriter:
    """csv.writer, with JSONL input's values made cells."""

    def __init__(self, out: IO[str], delimiter: str):
        self.writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")

    def writerow(self, values: list[Any]) -> None:
        self.writer.writerow([csv_cell(v) for v in values])
