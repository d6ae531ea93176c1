"""File formats of `moderation batch`: CSV and JSONL, either gzip-compressed by extension.

The format follows the file name: `.jsonl` or `.ndjson` is JSON Lines, anything else CSV, and a
trailing `.gz` compresses either; `-` (stdin, stdout) takes the other side's format. The
batch flow (`moderation.jobs.batch`) stays one: it reads `(cells, row)` pairs and writes rows
through a `writerow` writer, whatever the format:

- JSONL input: one JSON object per line. The header is the first object's keys; a key missing
  from a later object reads as a missing column (`None`), and keys the first object lacked are
  carried through (`Extra`) so that every input key reaches the output unchanged, values of any
  JSON type included (the OpenAI samples file scores as is).
- JSONL output: the input object, then the added fields typed (`flagged` a boolean, scores
  numbers, `error` null when the row was scored).
- gzip output keeps the journal's guarantee (a commit's end is a place to truncate and append
  to): every commit is one complete gzip member, and a gzip file of several members is one
  file to every reader (RFC 1952; `zcat`, Python's gzip). Members carry no timestamp, so a
  resumed job writes the bytes an uninterrupted one writes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

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


class JsonlReader:
    """Rows of a JSONL input as the batch flow reads CSV rows: a header, then (cells, row)."""

    def __init__(self, text: IO[str], name: str):
        self.name = name
        self.lines = iter(text)
        self.number = 0
        first = self._next_object()
        if first is None:
            raise FormatError(f"{name}: empty file, no JSON object")
        self.header: list[str] = list(first)
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
            cells += [Extra(k, v) for k, v in obj.items() if k not in self.header]
            yield cells, {k: cell_text(obj.get(k)) for k in self.header}


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
    its JSON; a key the header lacked as `key=JSON` after the columns (like a long row's
    cells)."""
    if isinstance(value, str):
        return value
    if value is MISSING or value is None:
        return ""
    if isinstance(value, Extra):
        return f"{value.key}={json.dumps(value.value, ensure_ascii=False)}"
    return json.dumps(value, ensure_ascii=False)


class CsvWriter:
    """csv.writer, with JSONL input's values made cells."""

    def __init__(self, out: IO[str], delimiter: str):
        self.writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")

    def writerow(self, values: list[Any]) -> None:
        self.writer.writerow([csv_cell(v) for v in values])
